"""A LoRA critic on a frozen base network: the fake-score model of VSD / SwiftBrush.

ProlificDreamer (Wang et al., NeurIPS 2023, arXiv:2305.16213, Sec. 3.2) and SwiftBrush (Nguyen & Tran, CVPR 2024,
arXiv:2312.05239, Sec. 3) estimate the score of the generator's distribution with a low-rank adapter (LoRA, Hu et al.
2022, arXiv:2106.09685) on the frozen pretrained teacher instead of a full trainable copy: the base weights are held
once, and only the adapters (and their optimizer state) are trained. SwiftBrush starts the adapter at zero (LoRA's
B = 0), so the critic equals its base network at the start.

``LoRACritic(base)`` is a ``Denoiser`` that

* holds ``base`` BY REFERENCE and freezes it. A shared base (the teacher) stays outside the critic's module registry,
  so its weights appear once in the module, its state dict and its parameter count (under ``teacher.``). An owned base
  (``own_base=True``: e.g. a frozen copy of the warm-started student when the teacher is the exact Gaussian mixture and
  has no weights) is registered under ``critic.base.`` so checkpoints carry it;
* builds peft LoRA layers (``peft.inject_adapter_in_model``) around the targeted ``nn.Linear`` / ``nn.Conv2d`` layers of
  the base, then takes them out of the base's tree again: each peft layer keeps the base layer as an unregistered
  reference and lives in the critic's ``adapters`` registry (state-dict keys
  ``critic.adapters.<path>.lora_A.critic.weight``);
* attaches the adapters only for the duration of its own forward pass (``attached()`` swaps the peft wrappers into the
  base's module tree and restores the original layers afterwards, also on error). Outside the critic's forward the
  base's module tree, state-dict keys and hooks are exactly the original ones, so the teacher's forward through the
  same layers is exactly the teacher's; this is the strict form of "adapters disabled except in the critic's forward".

Only the adapter weights are trainable (``critic.parameters()`` yields nothing else for a shared base; an owned base is
frozen). The base network always runs in eval mode (it is a frozen network, like the teacher); the adapters' dropout
follows the critic's own train/eval mode.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .wrapped import deepcopy_sharing_base

#: the peft adapter name; it shows up in the state-dict keys (``lora_A.critic.weight``)
ADAPTER_NAME = "critic"

#: default targets for diffusers UNets (peft matches a module whose name equals a target or ends with "." + target):
#: the attention projections (SwiftBrush adapts to_q / to_v of Stable Diffusion; SD-sized critics have room to spare,
#: a small pixel-space UNet needs more), the ResNet convolutions and their time-embedding projections, and for
#: UNet2DConditionModel the transformer blocks' projections and feed-forward layers.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
CONDITION_UNET_EXTRA_TARGETS = ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


def default_lora_targets(network: nn.Module) -> list[str]:
    """The layers a LoRA critic adapts when the config names none: the attention / convolution / time-embedding layers
    listed above for diffusers UNets, every ``nn.Linear`` for any other network (e.g. ``ToyMLPDenoiser``)."""
    from .diffusers_adapter import DiffusersUNetDenoiser

    if isinstance(network, DiffusersUNetDenoiser):
        targets = list(UNET_LORA_TARGETS)
        if network.unet_class == "UNet2DConditionModel":
            targets += CONDITION_UNET_EXTRA_TARGETS
        return targets
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(network).__name__} has no nn.Linear layers; give lora target_modules explicitly")
    return names


class LoRACritic(Denoiser):
    def __init__(self, base: Denoiser, rank: int = 8, alpha: float | None = None,
                 target_modules: Sequence[str] | str | None = None, dropout: float = 0.0, own_base: bool = False,
                 adapter_name: str = ADAPTER_NAME):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if alpha is not None and alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if base.schedule is None:
            raise ValueError("the LoRA critic's base network needs a noise schedule")
        super().__init__(base.schedule, prediction_type=base.prediction_type)
        base.requires_grad_(False).eval()
        self.own_base = own_base
        if own_base:
            self.base = base                          # registered: checkpoints carry the (e.g. warm-started) base
        else:
            self.__dict__["_shared_base"] = base      # by reference: the teacher's weights are held once
        targets = default_lora_targets(base) if target_modules is None else target_modules
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.target_modules = targets if isinstance(targets, str) else list(targets)

        # peft builds the LoRA layers inside the base (it matches names and dispatches on layer types) ...
        config = LoraConfig(r=rank, lora_alpha=self.alpha, lora_dropout=dropout, target_modules=self.target_modules,
                            init_lora_weights=True)   # A: Kaiming-uniform, B: zeros -> the critic starts as its base
        self.adapter_name = adapter_name               # "critic" for fake-score critics, "student" for LoRA students
        inject_adapter_in_model(config, base, adapter_name=adapter_name)
        base.__dict__.pop("peft_config", None)         # the only attribute peft leaves on the model itself
        # ... and we move them out again: the base's tree gets its original layers back, the critic keeps the wrappers.
        self.adapters = nn.ModuleDict()
        self._paths: list[str] = []
        for path, layer in [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]:
            original = layer.base_layer
            parent_path, _, child = path.rpartition(".")
            base.get_submodule(parent_path)._modules[child] = original
            del layer._modules["base_layer"]           # an unregistered reference: not in the critic's state dict,
            layer.__dict__["base_layer"] = original    # parameters or .to(); peft reads it as an attribute
            self.adapters[path.replace(".", "__")] = layer
            self._paths.append(path)
        self._attach_depth = 0

    # ------------------------------------------------------------------ the base network
    @property
    def base_network(self) -> Denoiser:
        return self.base if self.own_base else self.__dict__["_shared_base"]

    @property
    def num_classes(self) -> int:
        return getattr(self.base_network, "num_classes", 0)

    @property
    def data_shape(self):
        return self.base_network.data_shape

    @property
    def text_conditioned(self) -> bool:
        return bool(getattr(self.base_network, "text_conditioned", False))

    def feature_module(self):
        return self.base_network.feature_module()

    def adapter_layers(self) -> list[tuple[str, nn.Module]]:
        """(path in the base network, peft LoRA layer) pairs."""
        return [(path, self.adapters[path.replace(".", "__")]) for path in self._paths]

    def __deepcopy__(self, memo):
        """A copy with its own adapters on the *same* shared base: ``copy.deepcopy(lora_student)`` (the critic that
        starts as the student, ``AveragedModel``'s EMA copy) must not clone the frozen teacher -- a hidden,
        unregistered second teacher that ``.to()`` would not move. The base, its submodules, parameters and buffers
        are pre-seeded in ``memo``, so the adapters' ``base_layer`` references stay the teacher's own layers."""
        return deepcopy_sharing_base(self, memo)

    # ------------------------------------------------------------------ forward with the adapters attached
    @contextlib.contextmanager
    def attached(self):
        """Swap the LoRA layers into the base network's tree for the duration of the block (re-entrant)."""
        if self._attach_depth > 0:
            self._attach_depth += 1
            try:
                yield
            finally:
                self._attach_depth -= 1
            return
        base, swapped = self.base_network, []
        if "_backbones" not in self.__dict__:
            from .memory import diffusers_backbones
            self.__dict__["_backbones"] = diffusers_backbones(base)
        try:
            for backbone in self.__dict__["_backbones"]:  # read by memory.adapter_aware_checkpoint's recomputation
                backbone.__dict__["_attached_lora"] = self
            for path, layer in self.adapter_layers():
                parent_path, _, child = path.rpartition(".")
                parent = base.get_submodule(parent_path)
                if parent._modules[child] is not layer.base_layer:
                    raise RuntimeError(f"layer {path!r} of the LoRA critic's base network was replaced; "
                                       "the critic can no longer attach its adapter there")
                parent._modules[child] = layer
                swapped.append((parent, child, layer.base_layer))
            self._attach_depth = 1
            yield
        finally:
            self._attach_depth = 0
            for backbone in self.__dict__["_backbones"]:
                backbone.__dict__.pop("_attached_lora", None)
            for parent, child, original in reversed(swapped):
                parent._modules[child] = original

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        with self.attached():
            return self.base_network.predict(x_t, t, cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, *args, **kwargs) -> Tensor:
        """The base network's own forward with the adapters attached, so a base with a richer call (e.g. the
        guidance-embedded student's ``guidance=w``) keeps it."""
        with self.attached():
            return self.base_network(x_t, t, cond, *args, **kwargs)

    @torch.no_grad()
    def merged_copy(self) -> Denoiser:
        """A plain, trainable copy of the base network with this network's adapter deltas merged into its weights
        (peft's ``get_delta_weight``): the same function as this LoRA network, without adapters. What a method that
        wraps the student in adapters of its own (VSD's LoRA critic on a LoRA student) starts from, since peft cannot
        inject adapters into layers that already carry some."""
        import copy

        merged = copy.deepcopy(self.base_network)
        for path, layer in self.adapter_layers():
            target = merged.get_submodule(path)
            target.weight.add_(layer.get_delta_weight(self.adapter_name).to(target.weight.dtype))
        return merged.requires_grad_(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.own_base:
            self.base.eval()  # a frozen network never runs in training mode (dropout, batch statistics)
        return self

    # ------------------------------------------------------------------ adapter state
    @torch.no_grad()
    def reset_adapters(self) -> None:
        """LoRA B = 0 (SwiftBrush's initialisation): the critic's output equals its base network's again."""
        for _, layer in self.adapter_layers():
            nn.init.zeros_(layer.lora_B[self.adapter_name].weight)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A state dict of the base network's own keys (what ``DistillationModule.setup`` passes after the toy warm
        start: ``critic.load_state_dict(student.state_dict())``, "the critic starts as the warm-started student") sets
        an owned base to those weights and resets the adapters to zero, so the critic equals that network. Any other
        state dict (the critic's own keys) loads as usual. Lightning's checkpoint loading does not come through here
        (it loads submodules recursively), so checkpoints always restore the adapters."""
        if set(state_dict) == set(self.base_network.state_dict()) and set(state_dict) != set(self.state_dict()):
            if not self.own_base:
                raise ValueError("this LoRA critic adapts the shared teacher; loading a full network's weights into it "
                                 "would overwrite the teacher")
            result = self.base.load_state_dict(state_dict, strict=strict, assign=assign)
            self.reset_adapters()
            return result
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha}, layers={len(self._paths)}, "
                f"adapter_parameters={self.adapter_parameter_count()}, own_base={self.own_base}")
