"""Each method converges on the 8-mode ring in about a minute: a one-step student goes from the warm-started network
(which collapses onto the mean at sigma_max) to a sample set close to the true law. Ground truth: the exact mixture."""
import pytest

from tests.toy_runs import fit_and_measure

CASES = {
    # method: (batches, required improvement factor of sliced W2, max sliced-W2 ratio to the floor, max mode TV)
    # floors average 4 exact reference sets (issue 15 item 3), which reads ~1.2x lower than the single-set floor the
    # first bounds were set on; measured on it: dmd2 0.686 -> 0.075 (ratio 2.86), fdistill_js 0.686 -> 0.082 (3.11)
    "dmd2": (1500, 6.0, 3.5, 0.05),
    "sid": (800, 6.0, 3.5, 0.08),
    "cd": (1000, 2.5, 10.0, 0.06),
    # budgets cut to the shortest that keeps the bounds (suite time); measured at these budgets, one seed: cd 0.692 ->
    # 0.178 (ratio 6.8, TV 0.036), sid 0.534 -> 0.047 (1.78), sim 0.048 (1.82), sida 0.051 (1.94), uni_instruct 0.047
    # (1.78), dmd 0.686 -> 0.047 (1.77), diff_instruct 0.356 -> 0.045 (1.69); at 1000 batches dmd2 / fdistill_js
    # still sit at 0.16-0.17 (their warm-started student leaves the mean late), so they keep 1500
    "sim": (800, 6.0, 3.0, 0.08),
    "sida": (600, 6.0, 3.0, 0.08),
    # measured: fdistill_js 0.686 -> 0.079 (ratio 2.59), TV 0.040; uni_instruct 0.534 -> 0.045 (ratio 1.47), TV 0.033
    "fdistill_js": (1500, 6.0, 3.5, 0.06),
    "uni_instruct": (600, 6.0, 2.5, 0.06),
    "dmd": (500, 6.0, 3.0, 0.06),
    "diff_instruct": (600, 5.0, 3.0, 0.06),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_converges_on_ring(method, tmp_path):
    batches, factor, max_ratio, max_tv = CASES[method]
    overrides = [f"--data.init_args.batches_per_epoch={batches}", "--model.init_args.warm_start_steps=1000"]
    if method == "dmd":  # the teacher's ODE pairs are generated into the run's own folder
        overrides.append(f"--data.init_args.pairs_path={tmp_path / 'ring8-pairs.safetensors'}")
    before, after, seconds = fit_and_measure(f"experiments/toy/ring8/{method}.yaml", *overrides, root=str(tmp_path))
    print(f"{method}: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f} "
          f"(floor {after['sliced_w2_floor']:.4f}), TV {after['mode_weight_tv']:.4f}, {seconds:.1f}s")
    assert after["sliced_w2"] * factor < before["sliced_w2"]
    assert after["sliced_w2"] < max_ratio * after["sliced_w2_floor"]
    assert after["modes_covered"] == 8
    assert after["mode_weight_tv"] < max_tv
