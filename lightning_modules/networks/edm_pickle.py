"""A teacher from an NVlabs EDM network pickle (Karras et al. 2022, github.com/NVlabs/edm) or a saved EDM-style module.

    teacher:
      class_path: lightning_modules.networks.EDMPickleTeacher
      init_args: {path: /models/edm-cifar10-32x32-cond-vp.pkl, trust_pickle: true, code_path: /src/edm}

EDM's released ``.pkl`` files hold ``{"ema": EDMPrecond, ...}``; ``EDMPrecond(x, sigma, class_labels)`` already is
the preconditioned denoiser D(x; sigma) = E[x0 | x_sigma] of EDM Eq. 7, with one-hot labels, so this wrapper only
maps the framework's time onto sigma (the schedule's ``edm_sigma``; EDMSchedule by default, where they coincide) and
class ids onto one-hot rows. A ``.pt`` / ``.pth`` file saved with ``torch.save(module)`` (or a dict holding one under
``key``) works the same way, for any module with that call signature.

Pickles run code when loaded -- EDM's even carry their classes' source -- so loading one needs ``trust_pickle: true``
(and, for EDM's own files, the EDM repository's ``dnnlib`` / ``torch_utils`` importable: ``code_path``). Nothing is
unpickled without it. Plain weights should come as safetensors or a diffusers folder instead (``DiffusersUNetDenoiser``).
"""
from __future__ import annotations

import os
import pickle
import sys

import torch
from torch import Tensor, nn

from ..diffusion.schedules import EDMSchedule, NoiseSchedule
from .denoiser import Denoiser


def load_trusted_module(path: str, key: str | None = "ema", code_path: str | None = None) -> nn.Module:
    """The module in a trusted pickle / torch.save file (``key`` picks it out of a dict)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EDM network pickle {path!r} does not exist")
    if code_path is not None:
        if not os.path.isdir(code_path):
            raise FileNotFoundError(f"code_path {code_path!r} (the EDM repository, for dnnlib / torch_utils) is not a "
                                    "folder")
        if code_path not in sys.path:
            sys.path.insert(0, code_path)
    try:
        if path.endswith((".pt", ".pth")):
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with open(path, "rb") as handle:
                loaded = pickle.load(handle)
    except (ModuleNotFoundError, AttributeError) as error:
        raise ValueError(f"{path!r} needs code that is not importable ({error}); for NVlabs EDM pickles give "
                         "code_path: the EDM repository (dnnlib, torch_utils)") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        raise ValueError(f"{path!r} is not a readable network pickle ({type(error).__name__}: {error})") from None
    if isinstance(loaded, dict):
        if key not in loaded:
            raise ValueError(f"{path!r} holds keys {sorted(map(str, loaded))}, not {key!r}; set key to the network's")
        loaded = loaded[key]
    if not isinstance(loaded, nn.Module):
        raise ValueError(f"{path!r} ({key!r}) holds a {type(loaded).__name__}, not a torch module")
    return loaded


class EDMPickleTeacher(Denoiser):
    """D(x_t, t, class) = net(x_t, sigma(t), one_hot(class)) of a trusted EDM-style network (x0 prediction)."""

    def __init__(self, path: str, trust_pickle: bool = False, key: str | None = "ema", code_path: str | None = None,
                 schedule: NoiseSchedule | None = None):
        if not trust_pickle:
            raise ValueError(f"refusing to unpickle {path!r}: loading a pickle runs the code inside it; set "
                             "trust_pickle: true only for a file from a source you trust")
        network = load_trusted_module(path, key, code_path)
        sigma_data = float(getattr(network, "sigma_data", 0.5))
        super().__init__(schedule if schedule is not None else EDMSchedule(sigma_data=sigma_data), prediction_type="x0")
        self.network = network.eval().requires_grad_(False)
        self.sigma_data = sigma_data
        self.num_classes = int(getattr(network, "label_dim", 0) or 0)
        resolution, channels = getattr(network, "img_resolution", None), getattr(network, "img_channels", None)
        self._shape = None if resolution is None or channels is None else (int(channels), int(resolution),
                                                                           int(resolution))

    @property
    def data_shape(self):
        return self._shape

    def predict(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        sigma = self.schedule.edm_sigma(t.double()).to(x_t.device)
        alpha, _ = self.schedule.alpha_sigma(t.double())
        # the framework's x_t = alpha (x0 + sigma_edm eps); EDM's network takes the unscaled x0 + sigma_edm eps
        x_edm = x_t / alpha.to(x_t).reshape(-1, *([1] * (x_t.ndim - 1)))
        labels = None
        if self.num_classes and cond is not None:
            labels = torch.zeros(x_t.shape[0], self.num_classes, device=x_t.device, dtype=x_t.dtype)
            known = cond.long() < self.num_classes  # the null label (>= num_classes) stays all-zero: unconditional
            labels[known, cond.long()[known]] = 1
        return self.network(x_edm, sigma.to(x_t.dtype), labels).to(x_t.dtype)
