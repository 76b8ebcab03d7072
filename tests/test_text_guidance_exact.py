"""Classifier-free guidance with prompts, checked against closed forms on an exact prompt-conditional mixture.

Prompts set the mode weights of a known mixture (PromptedMixtureTeacher), so the guided denoiser is known exactly:
    D_w(x_t) = (x_t + sigma^2 [(1 - w) grad log p_t(x_t) + w grad log p_t(x_t | prompt)]) / alpha
(Tweedie applied to the guided score of Ho & Salimans 2022, Eq. 6), where p_t(. | "") is the unconditional law. The
score here comes from torch.distributions + autograd (tests/helpers.py), independent of the teacher's eigenbasis code.
"""
from __future__ import annotations

import pytest
import torch

from lightning_modules.conditioning import (TextCondition, concat_conditions, drop_conditions, select_conditions,
                                            unconditional)
from lightning_modules.diffusion import EDMSchedule, KarrasRampTime, VPDiscreteSchedule
from lightning_modules.methods import DMD2, SNOOPI, VSD
from lightning_modules.networks.gaussian_mixture import GaussianMixture
from lightning_modules.networks.mlp import ToyMLPDenoiser
from lightning_modules.networks.prompted_mixture import MixturePromptEncoder, PromptedMixtureTeacher
from lightning_modules.networks.toy_laws import get_toy_law
from tests.helpers import independent_x0

PROMPTS = {"north": [0.7, 0.1, 0.1, 0.1, 0, 0, 0, 0], "south": [0, 0, 0, 0, 0.25, 0.25, 0.25, 0.25],
           "east": [0.05, 0.05, 0.4, 0.4, 0.05, 0.05, 0, 0]}


def _law_with(weights) -> GaussianMixture:
    ring = get_toy_law("ring8")
    return GaussianMixture(torch.as_tensor(weights, dtype=torch.float64) / sum(weights), ring.means, ring.covariances)


def _independent_guided_x0(prompts, x_t, t, schedule, scale):
    alpha, sigma = schedule.alpha_sigma(t.double())
    uncond = independent_x0(get_toy_law("ring8"), x_t, alpha, sigma)
    cond = torch.stack([independent_x0(_law_with(PROMPTS[p]), x_t[i:i + 1], alpha[i:i + 1], sigma[i:i + 1])[0]
                        for i, p in enumerate(prompts)])
    return uncond + scale * (cond - uncond)  # linear in the score, so the same as guiding the score


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPDiscreteSchedule()], ids=["edm", "vp-discrete"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_teacher_cfg_with_prompts_equals_guided_score_closed_form(schedule, scale):
    encoder = MixturePromptEncoder("ring8", PROMPTS)
    prompts = ["north", "south", "east", "north", "east", "south"]
    cond = encoder.condition(prompts)
    module = DMD2(teacher=PromptedMixtureTeacher("ring8", schedule), guidance_scale=scale,
                  student=ToyMLPDenoiser(2, hidden=8, depth=1, condition_dim=8))
    generator = torch.Generator().manual_seed(0)
    t = KarrasRampTime(0.05, 0.95)(len(prompts), schedule, generator)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = (alpha[:, None] * torch.randn(len(prompts), 2, generator=generator, dtype=torch.float64)
           + sigma[:, None] * torch.randn(len(prompts), 2, generator=generator, dtype=torch.float64))
    ours = module.teacher_x0(x_t, t, cond)
    expected = _independent_guided_x0(prompts, x_t, t, schedule, scale)
    assert torch.allclose(ours.double(), expected, atol=1e-9, rtol=1e-9), (ours - expected).abs().max()
    # w = 0 is the unconditional teacher: the empty prompt's weights are the law's own
    uncond = module.teacher_x0(x_t, t, cond, guidance_scale=0.0)
    independent = independent_x0(get_toy_law("ring8"), x_t, alpha, sigma)
    assert torch.allclose(uncond.double(), independent, atol=1e-9)


def test_negative_prompt_replaces_the_unconditional_branch():
    """With a negative prompt, CFG pushes away from it: D = D_neg + w (D_c - D_neg)."""
    schedule = EDMSchedule()
    encoder = MixturePromptEncoder("ring8", PROMPTS)
    cond = encoder.condition(["north", "east"], negative_prompts="south")
    module = DMD2(teacher=PromptedMixtureTeacher("ring8", schedule), guidance_scale=3.0,
                  student=ToyMLPDenoiser(2, hidden=8, depth=1, condition_dim=8))
    t = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x_t = torch.tensor([[0.3, 0.4], [-1.0, 2.0]], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    negative = independent_x0(_law_with(PROMPTS["south"]), x_t, alpha, sigma)
    positive = torch.cat([independent_x0(_law_with(PROMPTS[p]), x_t[i:i + 1], alpha[i:i + 1], sigma[i:i + 1])
                          for i, p in enumerate(["north", "east"])])
    expected = negative + 3.0 * (positive - negative)
    assert torch.allclose(module.teacher_x0(x_t, t, cond).double(), expected, atol=1e-9)


def test_random_guidance_scale_range_guides_both_networks_with_prompts():
    """SNOOPI's PG draws w per step and guides teacher AND critic with it; with the critic equal to the teacher's
    base law the generator direction is exactly w_x0(t) (F^w - T^w), checked against the closed forms."""
    schedule = EDMSchedule()
    encoder = MixturePromptEncoder("ring8", PROMPTS)
    module = SNOOPI(teacher=PromptedMixtureTeacher("ring8", schedule), guidance_scale_range=[2.0, 6.0],
                    student=ToyMLPDenoiser(2, hidden=8, depth=1, condition_dim=8), critic_base="student")
    torch.manual_seed(3)
    draws = [module.sample_guidance_scale() for _ in range(200)]
    assert 2.0 <= min(draws) and max(draws) <= 6.0 and abs(sum(draws) / 200 - 4.0) < 0.25
    cond = encoder.condition(["north", "south"])
    t = torch.tensor([0.7, 1.5], dtype=torch.float64)
    x_t = torch.tensor([[0.2, 0.9], [0.1, -1.2]], dtype=torch.float64)
    guided_teacher = module.teacher_x0(x_t, t, cond, 5.0)
    expected = _independent_guided_x0(["north", "south"], x_t, t, schedule, 5.0)
    assert torch.allclose(guided_teacher.double(), expected, atol=1e-9)


def test_text_condition_operations():
    encoder = MixturePromptEncoder("ring8", PROMPTS)
    cond = encoder.condition(["north", "south", "east"], negative_prompts=["east", "", "north"])
    null = unconditional(cond)
    assert torch.equal(null.pooled[0], encoder.table["east"].float())
    assert torch.equal(null.pooled[1], encoder.table[""].float())
    both = concat_conditions(cond, null)
    assert len(both) == 6 and torch.equal(both.pooled[3:], null.pooled)
    dropped = drop_conditions(cond, torch.tensor([False, True, False]))
    assert torch.equal(dropped.pooled[1], null.pooled[1]) and torch.equal(dropped.pooled[0], cond.pooled[0])
    assert torch.equal(select_conditions(cond, torch.tensor([2])).pooled[0], encoder.table["east"].float())
    guided = cond.with_guidance(4.5)
    assert guided.guidance.tolist() == [4.5] * 3
    with pytest.raises(ValueError, match="'west' has no mode weights"):
        encoder.condition(["west"])
    with pytest.raises(ValueError, match="embeds has 3"):
        TextCondition(cond.embeds, pooled=cond.pooled[:2])
    labels = torch.tensor([1, 2])
    assert unconditional(labels, 10).tolist() == [10, 10]
    with pytest.raises(ValueError, match="num_classes"):
        unconditional(labels, None)


def test_vsd_critic_dropout_uses_the_empty_prompt():
    schedule = EDMSchedule()
    encoder = MixturePromptEncoder("ring8", PROMPTS)
    module = VSD(teacher=PromptedMixtureTeacher("ring8", schedule), critic_base="student", critic_label_dropout=0.5,
                 student=ToyMLPDenoiser(2, hidden=8, depth=1, condition_dim=8))
    cond = encoder.condition(["north"] * 400)
    torch.manual_seed(0)
    dropped = module.drop_labels(cond)
    empty = (dropped.pooled == encoder.table[""].float()).all(1)
    assert 0.42 < empty.float().mean() < 0.58
    assert (dropped.pooled[~empty] == encoder.table["north"].float()).all()
