"""iCT and ECT on the 8-mode ring: the one-step student (warm-started as a denoiser, which collapses onto the mean at
sigma_max) improves its ground-truth sliced W2 within ~1-2 CPU minutes, with the configs' settings and the
curriculum callback. Teacher-free consistency training is far slower than CD on this budget (the paper runs 400k
iterations); the factors below are what one seed measured, with margin, not the paper's quality."""
import pytest

from tests.toy_runs import fit_and_measure

CASES = {
    # method: (batches, required improvement factor of sliced W2, overrides)
    "ict": (1000, 2.0, []),  # measured, one seed: 0.692 -> 0.286 (2.4x), TV 0.035 (1500 batches: 0.231)
    "ect": (1000, 1.1, []),  # measured, one seed: 0.692 -> 0.572 (1.21x), TV 0.079 (1500 batches: 0.498)
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_consistency_training_improves_on_ring(method, tmp_path):
    batches, factor, extra = CASES[method]
    overrides = [f"--data.init_args.batches_per_epoch={batches}", "--model.init_args.warm_start_steps=1000", *extra]
    before, after, seconds = fit_and_measure(f"experiments/toy/ring8/{method}.yaml", *overrides, root=str(tmp_path))
    print(f"{method}: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f} "
          f"(floor {after['sliced_w2_floor']:.4f}), TV {after['mode_weight_tv']:.4f}, {seconds:.1f}s")
    assert after["sliced_w2"] * factor < before["sliced_w2"]
    assert after["modes_covered"] == 8


@pytest.mark.slow  # a study of the mechanism (28 s); the per-method convergence tests above stay in `make test`
def test_teacher_free_target_on_cd_settings_converges_like_cd(tmp_path):
    """The shared mechanism: ring8/cd.yaml with its teacher ODE step replaced by the teacher-free target x + r z
    (the same z; CM Eq. 10, consistency training) -- one seed measured sliced W2 0.692 -> 0.183 against CD's
    0.692 -> 0.177: on CD's uniform 18-point grid the CT target converges as fast as the teacher's, so the slower
    iCT / ECT runs above come from their paper schedules (rare high-sigma pairs, shrinking gaps), not the mechanism."""
    import types

    from callbacks import GroundTruthMetrics
    from tests.toy_runs import build

    cli = build("experiments/toy/ring8/cd.yaml", "--data.init_args.batches_per_epoch=1500",
                "--model.init_args.warm_start_steps=1000", root=str(tmp_path))
    module = cli.model
    module.target_point = types.MethodType(
        lambda self, batch, x0, noise, x_noisy, t_noisy, t_clean, cond: self.schedule.add_noise(x0, noise, t_clean),
        module)
    module.setup("fit")
    metric = GroundTruthMetrics(num_samples=3000, nfe=[1], num_floor_sets=1, verbose=False)
    before = metric.evaluate(module, cli.datamodule.law)[1]
    cli.trainer.fit(module, cli.datamodule)
    after = metric.evaluate(module, cli.datamodule.law)[1]
    print(f"ct on cd settings: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f}")
    assert after["sliced_w2"] * 2.5 < before["sliced_w2"]  # CD's own factor in tests/test_convergence.py
    assert after["modes_covered"] == 8
