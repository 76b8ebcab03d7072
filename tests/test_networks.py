"""Denoiser networks: EDM preconditioning, the toy MLP and the diffusers UNet adapter."""
import math
import os

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule, VPContinuousSchedule, VPDiscreteSchedule
from lightning_modules.networks import (DiffusersUNetDenoiser, FeatureTap, ToyMLPDenoiser, edm_coefficients,
                                        edm_precondition)

F64 = torch.float64

UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=11)


# --------------------------------------------------------------------------- EDM preconditioning
def test_edm_coefficients_table1():
    """c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4
    (Karras et al. 2022, Table 1); boundary variant c_skip = sd^2/((s-s0)^2+sd^2), c_out = (s-s0) sd/sqrt(s^2+sd^2)
    (Song et al. 2023, App. C)."""
    sigma = torch.tensor([0.002, 0.01, 0.3, 1.0, 7.0, 80.0], dtype=F64)
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sd)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-14)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-14)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-14)
    c_skip, c_out, c_in2, _ = edm_coefficients(sigma, sd, boundary_sigma=0.002)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd ** 2 / ((s - 0.002) ** 2 + sd ** 2), rel=1e-14)
        assert c_out[i].item() == pytest.approx((s - 0.002) * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-14, abs=1e-300)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    torch.testing.assert_close(c_in2, c_in)


@pytest.mark.parametrize("schedule_factory", [EDMSchedule, VPContinuousSchedule])
def test_edm_precondition_wiring(schedule_factory):
    """edm_precondition: F sees c_in x / alpha and c_noise(edm_sigma); D = c_skip x / alpha + c_out F."""
    schedule = schedule_factory()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.linspace(schedule.t_min, schedule.t_max, 7, dtype=F64)[1:-1]
    seen = {}

    def backbone(inp, c_noise, cond):
        seen.update(inp=inp, c_noise=c_noise, cond=cond)
        return torch.sin(inp) + c_noise[:, None]

    out = edm_precondition(backbone, x, t, "label", schedule, 0.5)
    alpha, sigma = schedule.alpha_sigma(t)
    s = sigma / alpha
    total = s ** 2 + 0.25
    scaled = x / alpha[:, None]
    torch.testing.assert_close(seen["inp"], scaled / total.sqrt()[:, None], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(seen["c_noise"], s.log() / 4, rtol=1e-14, atol=1e-14)
    assert seen["cond"] == "label"
    expected = (0.25 / total)[:, None] * scaled + (0.5 * s / total.sqrt())[:, None] * (
        torch.sin(seen["inp"]) + (s.log() / 4)[:, None])
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------- toy MLP
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_toy_mlp_boundary_condition(dtype):
    """ToyMLPDenoiser(boundary_condition=True) on EDM: D(x, t_min) = x exactly (c_skip = 1, c_out = 0), and not at
    larger t; without the boundary condition D(x, t_min) != x."""
    torch.manual_seed(0)
    schedule = EDMSchedule()
    net = ToyMLPDenoiser(dim=2, hidden=32, depth=2, num_classes=3, boundary_condition=True, schedule=schedule)
    net = net.to(dtype)
    x = torch.randn(16, 2, dtype=dtype)
    cond = torch.arange(16) % 4
    at_min = net(x, torch.full((16,), schedule.t_min, dtype=F64), cond)
    assert at_min.dtype == dtype
    assert torch.equal(at_min, x)
    assert (net(x, torch.full((16,), 0.5, dtype=F64), cond) - x).abs().max() > 1e-3
    free = ToyMLPDenoiser(dim=2, hidden=32, depth=2, boundary_condition=False, schedule=schedule).to(dtype)
    assert not torch.equal(free(x, torch.full((16,), schedule.t_min, dtype=F64)), x)


def test_toy_mlp_is_preconditioned_backbone():
    """ToyMLPDenoiser.predict == c_skip x + c_out backbone(c_in x, c_noise, cond) with Table-1 coefficients."""
    torch.manual_seed(1)
    schedule = EDMSchedule()
    net = ToyMLPDenoiser(dim=3, hidden=16, depth=3, num_classes=2, schedule=schedule).double()
    x = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=F64)
    cond = torch.tensor([0, 1, 2, 1])
    c_skip, c_out, c_in, c_noise = edm_coefficients(t, 0.5)
    expected = c_skip[:, None] * x + c_out[:, None] * net.backbone(c_in[:, None] * x, c_noise, cond)
    torch.testing.assert_close(net(x, t, cond), expected, rtol=1e-12, atol=1e-12)
    assert net.data_shape == (3,)
    with pytest.raises(ValueError, match="hidden=0"):
        ToyMLPDenoiser(dim=2, hidden=0)


def test_denoiser_without_schedule_raises():
    """A Denoiser without a schedule refuses to run and says so."""
    net = ToyMLPDenoiser(dim=2, hidden=8, depth=1)
    with pytest.raises(RuntimeError, match="no noise schedule"):
        net(torch.zeros(1, 2), torch.ones(1))


# --------------------------------------------------------------------------- diffusers UNet adapter
def _unet_inputs(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.tensor([0, 5, 10])[:n]


@pytest.fixture(scope="module")
def epsilon_unet():
    torch.manual_seed(0)
    return DiffusersUNetDenoiser(config=dict(UNET_CONFIG), prediction_type="epsilon", schedule=VPDiscreteSchedule())


def test_unet_native_epsilon(epsilon_unet):
    """forward(prediction="epsilon") is the raw UNet output at the DDPM timestep; x0 = (x - sigma eps) / alpha."""
    net = epsilon_unet
    assert net.data_shape == (1, 8, 8)
    x, cond = _unet_inputs()
    t = torch.tensor([10.0, 400.0, 999.0], dtype=F64)
    with torch.no_grad():
        raw = net.unet(x, t.float(), class_labels=cond).sample
        eps = net(x, t, cond, prediction="epsilon")
        x0 = net(x, t, cond)
    assert torch.equal(eps, raw)
    alpha, sigma = net.schedule.alpha_sigma(t)
    expected_x0 = (x.double() - sigma[:, None, None, None] * raw.double()) / alpha[:, None, None, None]
    torch.testing.assert_close(x0.double(), expected_x0, rtol=1e-5, atol=1e-5)
    # round trip through x0 and v back to epsilon
    v = net.convert(x0, "x0", "v", x, t)
    torch.testing.assert_close(net.convert(v, "v", "epsilon", x, t), raw, rtol=1e-4, atol=1e-4)


def test_unet_edm_preconditioning():
    """preconditioning="edm": x0 = c_skip x + c_out F(c_in x, ln(sigma)/4, class) with F the raw UNet."""
    torch.manual_seed(1)
    schedule = EDMSchedule()
    net = DiffusersUNetDenoiser(config=dict(UNET_CONFIG), preconditioning="edm", schedule=schedule)
    assert net.prediction_type == "x0"
    x, cond = _unet_inputs(seed=1)
    t = torch.tensor([0.02, 0.7, 30.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = (c[:, None, None, None] for c in edm_coefficients(t, 0.5))
    with torch.no_grad():
        raw = net.unet((c_in * x.double()).float(), c_noise.flatten().float(), class_labels=cond).sample
        out = net(x, t, cond)
    torch.testing.assert_close(out.double(), c_skip * x.double() + c_out * raw.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'karras'"):
        DiffusersUNetDenoiser(config=dict(UNET_CONFIG), preconditioning="karras")


def test_unet_save_and_reload(tmp_path, epsilon_unet):
    """save_pretrained + DiffusersUNetDenoiser(pretrained_path=folder) reproduces the outputs bit for bit."""
    folder = str(tmp_path / "unet")
    epsilon_unet.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "config.json"))
    reloaded = DiffusersUNetDenoiser(pretrained_path=folder, prediction_type="epsilon", schedule=VPDiscreteSchedule())
    x, cond = _unet_inputs(seed=2)
    t = torch.tensor([3.0, 250.0, 800.0], dtype=F64)
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, cond), epsilon_unet(x, t, cond))
    assert reloaded.data_shape == (1, 8, 8)


def test_unet_missing_config_names_folder(tmp_path):
    """A folder without config.json raises FileNotFoundError naming the folder; config and path are exclusive."""
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_model"):
        DiffusersUNetDenoiser(pretrained_path=str(empty))
    with pytest.raises(ValueError, match="exactly one"):
        DiffusersUNetDenoiser(config=dict(UNET_CONFIG), pretrained_path=str(empty))
    with pytest.raises(ValueError, match="'UNet3DModel'"):
        DiffusersUNetDenoiser(config=dict(UNET_CONFIG), unet_class="UNet3DModel")


def test_feature_tap_captures_mid_block(epsilon_unet):
    """FeatureTap records the mid-block output (B, 16, 4, 4) of a normal forward call and removes its hook."""
    net = epsilon_unet
    x, cond = _unet_inputs(seed=3)
    t = torch.tensor([1.0, 500.0, 900.0], dtype=F64)
    captured = {}
    handle = net.unet.mid_block.register_forward_hook(lambda m, i, o: captured.update(out=o))
    try:
        with torch.no_grad(), FeatureTap(net) as tap:
            net(x, t, cond)
    finally:
        handle.remove()
    assert tap.features.shape == (3, 16, 4, 4)
    assert torch.equal(tap.features, captured["out"])
    assert len(net.unet.mid_block._forward_hooks) == 0
    with pytest.raises(ValueError, match="feature_module"):
        FeatureTap(_NoFeatures())


class _NoFeatures(ToyMLPDenoiser):
    def __init__(self):
        super().__init__(dim=2, hidden=4, depth=1)

    def feature_module(self):
        return None


def test_unet2d_condition_adapter_takes_encoder_states_and_converts_spaces():
    """UNet2DConditionModel behind the Denoiser contract: cond is the encoder hidden states; epsilon -> x0 follows
    x0 = (x_t - sigma eps) / alpha on the VP-discrete schedule."""
    import torch
    from lightning_modules.diffusion import VPDiscreteSchedule
    from lightning_modules.networks import DiffusersUNetDenoiser

    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                  norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    schedule = VPDiscreteSchedule()
    net = DiffusersUNetDenoiser(config=config, unet_class="UNet2DConditionModel", prediction_type="epsilon",
                                schedule=schedule)
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    states = torch.randn(2, 3, 12)
    eps = net(x_t, t, states, prediction="epsilon")
    assert torch.equal(eps, net.unet(x_t, t, encoder_hidden_states=states).sample)
    alpha, sigma = schedule.alpha_sigma(t)
    x0 = net(x_t, t, states, prediction="x0")
    expected = (x_t.double() - sigma[:, None, None, None] * eps.double()) / alpha[:, None, None, None]
    assert torch.allclose(x0.double(), expected, atol=1e-5)
    assert not torch.allclose(eps, net(x_t, t, torch.randn(2, 3, 12), prediction="epsilon"))
    assert net.data_shape == (1, 8, 8) and net.num_classes == 0
