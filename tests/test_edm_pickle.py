"""EDMPickleTeacher: an EDM-style network pickle as a teacher, exact on a closed-form stand-in, refused untrusted."""
from __future__ import annotations

import pickle

import pytest
import torch

from lightning_modules.diffusion import EDMSchedule, VPContinuousSchedule
from lightning_modules.networks import EDMPickleTeacher
from tests.tiny_edm import GaussianEDMPrecond


def _pickle(tmp_path, network, name="network.pkl", key="ema"):
    path = tmp_path / name
    with open(path, "wb") as handle:
        pickle.dump({key: network, "augment_pipe": None}, handle)
    return str(path)


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPContinuousSchedule()], ids=["edm", "vp"])
def test_prediction_is_the_networks_denoiser_at_the_schedules_sigma(tmp_path, schedule):
    network = GaussianEDMPrecond(sigma_data=0.6, label_dim=3)
    teacher = EDMPickleTeacher(_pickle(tmp_path, network), trust_pickle=True, schedule=schedule)
    assert teacher.num_classes == 3 and teacher.data_shape == (1, 4, 4) and teacher.sigma_data == 0.6
    generator = torch.Generator().manual_seed(0)
    t = torch.linspace(schedule.t_min * 1.5, schedule.t_max * 0.5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 3])  # 3 = the null label: unconditional
    x0 = torch.randn(6, 1, 4, 4, generator=generator)
    x_t = schedule.add_noise(x0, torch.randn(6, 1, 4, 4, generator=generator), t)
    alpha, sigma = schedule.alpha_sigma(t)
    edm_sigma = (sigma / alpha).reshape(-1, 1, 1, 1)
    # the exact posterior mean for x0 ~ N(m_c, 0.36 I), written out in the framework's scaling x_t = alpha (x0 + s eps)
    means = torch.tensor([-1.0, 0.0, 1.0, 0.0], dtype=torch.float64)[labels].reshape(-1, 1, 1, 1)
    expected = means + 0.36 * (x_t.double() / alpha.reshape(-1, 1, 1, 1) - means) / (edm_sigma ** 2 + 0.36)
    got = teacher(x_t, t, labels, prediction="x0")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_an_untrusted_pickle_is_not_opened(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as handle:
        pickle.dump({"ema": Payload()}, handle)
    with pytest.raises(ValueError, match="refusing to unpickle .*evil.pkl"):
        EDMPickleTeacher(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content, named", [(b"", "not a readable network pickle"),
                                            (b"not a pickle at all", "not a readable network pickle")])
def test_broken_files_are_named(tmp_path, content, named):
    path = tmp_path / "broken.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=named):
        EDMPickleTeacher(str(path), trust_pickle=True)


def test_wrong_key_and_missing_code_are_named(tmp_path):
    path = _pickle(tmp_path, GaussianEDMPrecond(), key="net")
    with pytest.raises(ValueError, match="holds keys .*'net'.*not 'ema'"):
        EDMPickleTeacher(path, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="code_path"):
        EDMPickleTeacher(path, trust_pickle=True, key="net", code_path=str(tmp_path / "no-edm-here"))
    assert isinstance(EDMPickleTeacher(path, trust_pickle=True, key="net").network, GaussianEDMPrecond)
