"""NCT -- Noise Consistency Training (Luo, Xue, Hu & Tang 2025, "Noise Consistency Training: A Native Approach for
One-Step Generator in Learning Additional Controls", arXiv:2506.19741).

Adds a NEW control c to an already distilled one-step generator G_theta (frozen) with a small adapter phi, using only
the generator and a control model h that reads c off a sample (an edge map, a class, a low-resolution image); no data
and no teacher. The adapter works in the generator's noise space (Sec. 3), where a variance-preserving diffusion
    z_s = sqrt(1 - s^2) z + s eps,    s in [0, 1],   z, eps ~ N(0, I)
leaves the marginal N(0, I) -- every z_s is a valid generator input -- while its coupling to c fades: pairs come from
the generator itself, x = G_theta(z), c = h(x), so z_0 = z is fully coupled to c and z_1 = eps independent of it.
The adapted generator G_phi(z_s, s, c) is trained to be CONSISTENT along this noise-space diffusion (consistency
training, Song et al. 2023, there on data; here on the generator's noise):

  z ~ N(0, I);  x = sg G_theta(z);  c = h(x)                       (the control the generator's own sample carries)
  n ~ U{1..N};  eps ~ N(0, I);  z_n = sqrt(1 - s_n^2) z + s_n eps    (adjacent levels, same z and eps)
  L(phi) = d( G_phi(z_n, s_n, c),  sg G_phi(z_{n-1}, s_{n-1}, c) )
  boundary: G_phi(z, 0, c) = G_theta(z)                            (built into the parameterisation below)

so G_phi(., s, c) maps z_s to the generator's output at the ODE end point of the noise-space flow of p(z | c); at
s = 1 the input is independent N(0, I) noise and G_phi(eps, 1, c) ~ p_G(x | c): the generator's law restricted to
the new condition. Sampling is one step, G_phi(z, 1, c). As we read the paper its adapter is a ControlNet-style
branch into the generator; here, so that any frozen generator (UNet, MLP, the exact ODE map) can be adapted without
touching its layers, the adapter acts on the generator's input noise:
    G_phi(z, s, c) = G_theta( z + s a_phi(z, s, c) )             (s = 0: exactly the frozen generator)
(``NoiseControlAdapter``; its last layer starts at zero, so training starts from G_theta). The consistency target
uses the adapter itself without gradient (sg(phi), iCT's choice) on a uniform grid s_n = n / N. Control models
``h``: ``MixtureComponentControl`` (the toy suite: which component of the exact mixture a sample belongs to -- the
law conditioned on a component is that Gaussian, so "the sample lands in the requested component" is ground truth)
and ``ClassifierControl`` (MNIST: the shipped classifier's digit).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..base import DistillationModule
from ..losses import distance
from ..networks.denoiser import Denoiser
from ..networks.mlp import FourierFeatures
from ..networks.ode_generator import TeacherODEGenerator
from .rewards import condition_labels


class NoiseControlAdapter(nn.Module):
    """a_phi(z, s, c): an MLP on the flattened noise, the noise level s (Fourier features) and an embedding of the new
    control c (``num_controls`` discrete values), returning a displacement of the noise's shape."""

    def __init__(self, data_shape, num_controls: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        if num_controls < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"NoiseControlAdapter needs positive sizes, got num_controls={num_controls}, "
                             f"hidden={hidden}, depth={depth}")
        self.data_shape = tuple(data_shape)
        dim = math.prod(self.data_shape)
        self.num_controls = num_controls
        self.level_features = FourierFeatures(32, scale=1.0)
        self.control_embedding = nn.Embedding(num_controls, hidden)
        self.input = nn.Linear(dim + 32, hidden)
        layers = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU())
        self.output = nn.Linear(hidden, dim)
        nn.init.zeros_(self.output.weight)   # a = 0 at the start: the adapted generator is the frozen one
        nn.init.zeros_(self.output.bias)

    def forward(self, z: Tensor, s: Tensor, control: Tensor) -> Tensor:
        if control.min() < 0 or control.max() >= self.num_controls:
            raise ValueError(f"control values must be in [0, {self.num_controls}), got "
                             f"[{int(control.min())}, {int(control.max())}]")
        h = self.input(torch.cat([z.flatten(1), self.level_features(s).to(z.dtype)], dim=1))
        h = h + self.control_embedding(control.long()).to(h.dtype)
        return self.output(self.body(h)).view_as(z)


class MixtureComponentControl(nn.Module):
    """h(x) = argmax_k p(component k | x) under a Gaussian-mixture law: the component a sample belongs to."""

    def __init__(self, law):
        super().__init__()
        from ..networks.toy_laws import resolve_law

        self.law = resolve_law(law)
        self.num_controls = self.law.num_components

    def forward(self, x: Tensor) -> Tensor:
        return self.law.component_log_prob(x.double()).argmax(1)


class ClassifierControl(nn.Module):
    """h(x) = the shipped MNIST classifier's digit for an image in [-1, 1]."""

    num_controls = 10

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from .rewards import ClassifierLogProb

        self.classifier = ClassifierLogProb(weights_path).classifier

    def forward(self, x: Tensor) -> Tensor:
        from ..evaluation.prompt_adherence import classifier_input

        device = next(self.classifier.parameters()).device
        return self.classifier(classifier_input(x).to(device)).argmax(1).to(x.device)


class NoiseConsistencyTraining(DistillationModule):
    """``student``: the already distilled one-step generator G_theta (frozen), or ``ode_generator_nfe``: the
    teacher's own ODE map with that many evaluations (the generator a perfect distillation gives; the toy configs
    use it); ``adapter``: a_phi (trained); ``control``: h (frozen). G_theta runs unconditionally (cond None: a
    class-conditional network's null label) -- the control is new to it."""

    def __init__(self, teacher: Denoiser, *args, adapter: nn.Module, control: nn.Module, num_noise_levels: int = 8,
                 ode_generator_nfe: int | None = None, distance_metric: str = "l2", huber_c: float | None = None,
                 **kwargs):
        if num_noise_levels < 1:
            raise ValueError(f"num_noise_levels must be >= 1, got {num_noise_levels}")
        distance(torch.zeros(1, 1), torch.zeros(1, 1), distance_metric, huber_c)  # fail early on an unknown metric
        if ode_generator_nfe is not None:
            if kwargs.get("student") is not None:
                raise ValueError("give student (a distilled generator) or ode_generator_nfe (the teacher's ODE map "
                                 "as the generator), not both")
            # the teacher's own PF-ODE map, held by reference (networks.ode_generator): the ideal distilled generator
            kwargs["student"] = TeacherODEGenerator(teacher, nfe=ode_generator_nfe)
        super().__init__(teacher, *args, **kwargs)
        if len(self.student_times) != 1:
            raise ValueError(f"NCT adapts a one-step generator; got {len(self.student_times)} student times")
        for store in (self.hparams, getattr(self, "_hparams_initial", None) or {}):  # networks: state, not hparams
            for key in ("adapter", "control"):
                if isinstance(store.get(key), nn.Module):
                    store.pop(key)
        adapter_controls = getattr(adapter, "num_controls", None)
        control_values = getattr(control, "num_controls", None)
        if adapter_controls is not None and control_values is not None and adapter_controls != control_values:
            raise ValueError(f"the adapter embeds {adapter_controls} control values but the control model gives "
                             f"{control_values}")
        self.adapter = adapter
        self.control = control.requires_grad_(False).eval()
        self.num_noise_levels = num_noise_levels
        self.distance_metric, self.huber_c = distance_metric, huber_c

    def setup(self, stage: str) -> None:
        if not any(True for _ in self.student.parameters()):
            self.warm_started.fill_(True)          # the teacher's ODE map has nothing to fit (benchmarks ask anyway)
        super().setup(stage)                       # the toy warm start (if any) fits a network generator first ...
        self.student.requires_grad_(False)         # ... which is frozen from then on

    def train(self, mode: bool = True):
        super().train(mode)
        self.student.eval()                        # the frozen generator never runs in training mode
        if getattr(self, "control", None) is not None:
            self.control.eval()
        return self

    def generator_parameters(self):
        return [p for p in self.adapter.parameters() if p.requires_grad]

    def averaged_network(self):
        return self.adapter                        # the EMA callback follows the adapter

    # ------------------------------------------------------------------ the adapted generator
    def frozen_generator(self, z: Tensor) -> Tensor:
        """G_theta(z): the distilled generator's one step from noise z."""
        return super().generate(z, None, None, self.student)

    def adapted_generator(self, z: Tensor, s: Tensor, control: Tensor, adapter: nn.Module | None = None) -> Tensor:
        """G_phi(z, s, c) = G_theta(z + s a_phi(z, s, c))."""
        adapter = self.adapter if adapter is None else adapter
        scale = s.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        return self.frozen_generator(z + scale * adapter(z, s, control))

    def generate(self, noise: Tensor, cond=None, nfe: int | None = None, network: nn.Module | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """One controlled step G_phi(z, 1, c) for the new control ``cond``; without one, the frozen generator."""
        control = condition_labels(cond)
        if control is None:
            return self.frozen_generator(noise)
        ones = torch.ones(noise.shape[0], dtype=torch.float64, device=noise.device)
        adapter = None if network is None or network is self.student else network  # sample(): EMA adapter or none
        return self.adapted_generator(noise, ones, control, adapter)

    def noise_levels(self) -> Tensor:
        return torch.linspace(0.0, 1.0, self.num_noise_levels + 1, dtype=torch.float64)

    # ------------------------------------------------------------------ the loss
    def noised(self, z: Tensor, eps: Tensor, s: Tensor) -> Tensor:
        scale = s.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        return (1 - scale ** 2).sqrt() * z + scale * eps

    def consistency_loss(self, z: Tensor, eps: Tensor, control: Tensor, n: Tensor) -> dict[str, Tensor]:
        levels = self.noise_levels().to(z.device)
        s_now, s_before = levels[n], levels[n - 1]
        online = self.adapted_generator(self.noised(z, eps, s_now), s_now, control)
        with torch.no_grad():
            target = self.adapted_generator(self.noised(z, eps, s_before), s_before, control)
        per_sample = distance(online, target, self.distance_metric, self.huber_c)
        return {"loss": per_sample.mean()}

    def generator_loss(self, batch):
        z = batch["noise"]
        with torch.no_grad():
            control = self.control(self.to_images(self.frozen_generator(z)))
        n = torch.randint(1, self.num_noise_levels + 1, (z.shape[0],), device=z.device)
        losses = self.consistency_loss(z, self.noise_like(z), control, n)
        with torch.no_grad():  # how often one controlled step lands where it was asked to (logged, not trained)
            check = min(64, z.shape[0])
            requested = control[:check]
            reached = self.control(self.to_images(self.generate(torch.randn_like(z[:check]), requested)))
            losses["control_accuracy"] = (reached == requested).float().mean()
        return losses
