"""PSO (methods/pso.py): the pairwise loss and its gradient against a hand-written formula, the preference ordering
by the exact mixture log-density, and a short ring8 run in which the reward rises while the sliced W2 stays put."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule
from lightning_modules.methods.pso import PairwiseSampleOptimization
from lightning_modules.methods.rewards import MixtureLogDensity
from lightning_modules.networks import GaussianMixtureTeacher, ToyMLPDenoiser


def _module(beta=3.0, **kwargs):
    torch.manual_seed(0)
    schedule = EDMSchedule()
    return PairwiseSampleOptimization(teacher=GaussianMixtureTeacher("ring8", schedule),
                                      student=ToyMLPDenoiser(dim=2, hidden=32, depth=2, sigma_data=0.5),
                                      reward=MixtureLogDensity("ring8", conditional=False), beta=beta,
                                      student_sigmas=[2.5], **kwargs).double()


def _pair(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    winner, loser = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g,
                                                                                    dtype=torch.float64)
    t = torch.full((n,), 0.7, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return winner, loser, t, eps


def _hand_loss(module, winner, loser, t, eps, beta):
    """-log sigmoid(-beta [(d(w) - d_ref(w)) - (d(l) - d_ref(l))]) written out per pair with EDM's x_t = x + sigma eps."""
    sigma = float(t[0])   # EDM: t is sigma, alpha = 1
    total = 0.0
    for i in range(winner.shape[0]):
        def d(net, x):
            x_t = (x[i] + sigma * eps[i])[None]
            return ((net(x_t, t[i:i + 1]) - x[i][None]) ** 2).mean()
        margin = (d(module.student, winner) - d(module.reference, winner).detach()) - (
            d(module.student, loser) - d(module.reference, loser).detach())
        total = total + torch.log1p(torch.exp(beta * margin))   # -log sigmoid(-z) = log(1 + e^z)
    return total / winner.shape[0]


def test_loss_at_the_reference_is_log2_and_its_gradient_is_half_beta_the_error_difference():
    module = _module(beta=3.0)
    winner, loser, t, eps = _pair()
    losses = module.pairwise_loss(winner, loser, t, eps, None)
    assert float(losses["loss"]) == pytest.approx(math.log(2), abs=1e-12)   # theta = ref: every margin is 0
    params = module.generator_parameters()
    grads = torch.autograd.grad(losses["loss"], params)
    # closed form at theta = ref: grad L = beta / 2 * grad mean_pairs [d_theta(x_w) - d_theta(x_l)]
    d_w = module.denoising_error(module.student, winner, t, eps, None)
    d_l = module.denoising_error(module.student, loser, t, eps, None)
    expected = torch.autograd.grad(1.5 * (d_w - d_l).mean(), params)
    assert all(torch.allclose(g, e, atol=1e-12) for g, e in zip(grads, expected))
    assert sum(float(g.abs().sum()) for g in grads) > 1e-3


def test_loss_and_gradient_away_from_the_reference_match_the_hand_formula():
    module = _module(beta=2.5)
    with torch.no_grad():                                  # move the student off its reference copy
        for p in module.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    winner, loser, t, eps = _pair(seed=3)
    ours = module.pairwise_loss(winner, loser, t, eps, None)["loss"]
    hand = _hand_loss(module, winner, loser, t, eps, 2.5)
    assert float(ours) == pytest.approx(float(hand), rel=1e-10)
    assert abs(float(ours) - math.log(2)) > 1e-4
    params = module.generator_parameters()
    for g, e in zip(torch.autograd.grad(ours, params), torch.autograd.grad(hand, params)):
        assert torch.allclose(g, e, atol=1e-12)


def test_pairs_are_ordered_by_the_exact_log_density():
    module = _module()
    module.reference.requires_grad_(False)
    batch = {"noise": torch.randn(64, 2, dtype=torch.float64), "cond": None}
    torch.manual_seed(5)
    winner, loser, gap = module.preference_pairs(batch)
    law = GaussianMixtureTeacher("ring8").law
    assert bool((law.log_prob(winner) >= law.log_prob(loser)).all())
    assert torch.allclose(gap.double(), law.log_prob(winner) - law.log_prob(loser), atol=1e-9)
    # rho = 0.5 neighbours: corr(z_a, z_b) = 0.5 over many draws
    z = torch.randn(20000, 2)
    assert float(torch.corrcoef(torch.stack([z[:, 0], module.neighbour_noise(z)[:, 0]]))[0, 1]) == pytest.approx(
        0.5, abs=0.03)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="unknown pair_source 'offline'"):
        _module(pair_source="offline")
    with pytest.raises(ValueError, match="pair_source: online orders the student's own pairs by a reward"):
        PairwiseSampleOptimization(teacher=GaussianMixtureTeacher("ring8", EDMSchedule()),
                                   student=ToyMLPDenoiser(dim=2, hidden=8, depth=1, sigma_data=0.5), student_sigmas=[2.5])
    with pytest.raises(ValueError, match="beta .* got 0"):
        _module(beta=0)
    with pytest.raises(ValueError, match="pair_correlation .* got 1.0"):
        _module(pair_correlation=1.0)


def _short_ring8_run(name, tmp_path):
    """experiments/toy/ring8/<name>.yaml at 200 batches after a 500-step warm start, set up but not fitted, with a
    one-step ground-truth metric."""
    from callbacks import GroundTruthMetrics
    from tests.toy_runs import build

    cli = build(f"experiments/toy/ring8/{name}.yaml", "--data.init_args.batches_per_epoch=200",
                "--model.init_args.warm_start_steps=500",
                "--model.init_args.generator_lr_scheduler.init_args.T_max=200", root=str(tmp_path))
    module, datamodule = cli.model, cli.datamodule
    module.setup("fit")
    metric = GroundTruthMetrics(num_samples=3000, nfe=[1], num_floor_sets=1, verbose=False)
    return cli, module, datamodule, metric


def test_pso_raises_the_reward_without_blowing_up_sliced_w2(tmp_path):
    """ring8/pso.yaml at 200 batches, warm start 500. Measured, one seed: sliced W2 0.538 -> 0.445 (floor 0.026),
    median log p of the one-step samples -45.4 -> -15.1, 8/8 modes; the mode-weight TV rises 0.011 -> 0.30 (at 300
    batches: log p -5.8, SW2 0.578, TV 0.44 -- the log-density reward favours the modes the blurry start lands
    nearest: reward hacking, which the DPO margin to the reference only slows)."""
    cli, module, datamodule, metric = _short_ring8_run("pso", tmp_path)
    noise = torch.randn(3000, 2, generator=torch.Generator().manual_seed(7))
    before, x_before = metric.evaluate(module, datamodule.law)[1], module.sample(noise, None, 1)
    cli.trainer.fit(module, datamodule)
    after, x_after = metric.evaluate(module, datamodule.law)[1], module.sample(noise, None, 1)
    reward_before = float(module.reward(x_before.double()).median())
    reward_after = float(module.reward(x_after.double()).median())
    print(f"pso: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f}, median log p {reward_before:.2f} -> "
          f"{reward_after:.2f}, TV {after['mode_weight_tv']:.3f}, modes {after['modes_covered']}")
    assert reward_after > reward_before + 20.0
    assert after["sliced_w2"] < 1.25 * before["sliced_w2"]
    assert after["modes_covered"] == 8


def test_target_pairs_prefer_the_training_samples_over_the_students_own_and_need_real_data():
    module = _module(pair_source="target")
    assert module.needs_real_data and "pair_source: target" in module.real_data_reason
    real = torch.randn(5, 2, dtype=torch.float64)
    batch = {"noise": torch.randn(7, 2, dtype=torch.float64), "real": real, "real_cond": None}
    torch.manual_seed(3)
    winner, loser, cond = module.target_pairs(batch)
    torch.manual_seed(3)
    expected_loser = module.generate(torch.randn(5, 2, dtype=torch.float64), None)
    assert torch.equal(winner, real) and cond is None
    torch.testing.assert_close(loser, expected_loser)
    # at theta = ref every margin is 0: the loss is log 2 here too
    torch.manual_seed(4)
    losses = module.generator_loss(batch)
    assert float(losses["loss"]) == pytest.approx(math.log(2), abs=1e-12)


def test_pso_target_images_pull_the_one_step_student_toward_the_training_law(tmp_path):
    """ring8/pso_target.yaml at 200 batches, warm start 500. Measured, one seed: sliced W2 0.538 -> 0.288 (floor
    0.026), mode-weight TV 0.011 -> 0.018, 8/8 modes."""
    cli, module, datamodule, metric = _short_ring8_run("pso_target", tmp_path)
    before = metric.evaluate(module, datamodule.law)[1]
    cli.trainer.fit(module, datamodule)
    after = metric.evaluate(module, datamodule.law)[1]
    print(f"pso target: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f}, TV "
          f"{after['mode_weight_tv']:.3f}, modes {after['modes_covered']}")
    assert after["sliced_w2"] < 0.65 * before["sliced_w2"]
    assert after["mode_weight_tv"] < 0.05 and after["modes_covered"] == 8


def test_text_to_image_pairs_are_ordered_by_the_clip_score_of_their_own_prompt(tmp_path):
    """experiments/mnist_t2i/pso.yaml: the 4-step latent student's pairs, decoded and scored by the shipped MNIST CLIP
    against each row's prompt -- the winner's score is the larger of the two, and the prompt is what is scored."""
    import os

    from tests.test_t2i_configs import ROOT, _overrides
    from tests.toy_runs import build

    torch.manual_seed(0)
    cli = build(os.path.join(ROOT, "experiments", "mnist_t2i", "pso.yaml"), *_overrides(tmp_path))
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module.setup("fit")
    assert len(module.student_times) == 4 and not module.uses_critic
    torch.manual_seed(1)
    winner, loser, gap = module.preference_pairs(batch)
    prompts = batch["prompts"]
    r_w, r_l = module.score(winner, batch["cond"], prompts), module.score(loser, batch["cond"], prompts)
    assert torch.allclose(r_w - r_l, gap, atol=1e-3) and bool((gap >= 0).all()) and float(gap.max()) > 0
    shuffled = list(reversed(prompts))
    assert not torch.allclose(module.score(winner, batch["cond"], shuffled), r_w)  # the score reads the prompt
    loss = module.generator_loss(batch)["loss"]
    assert torch.isfinite(loss) and abs(float(loss) - math.log(2)) < 1e-4  # theta = ref at the start: L = log 2


def test_clip_reward_without_a_prompt_per_sample_names_the_counts():
    from lightning_modules.methods.rewards import CLIPReward

    reward = CLIPReward()
    images = torch.zeros(3, 1, 32, 32)
    with pytest.raises(ValueError, match="3 samples, no prompts"):
        reward(images)
    with pytest.raises(ValueError, match="3 samples, 2 prompts"):
        reward(images, prompts=["a 1", "a 2"])
