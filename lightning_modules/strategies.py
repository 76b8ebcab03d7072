"""Distributed strategies for distillation modules: FSDP with one unit per network, and a bf16 choice per device.

``DistillFSDP`` is Lightning's ``FSDPStrategy`` with what a distillation module needs:
  - each network (student, critic, discriminator head, consistency target; the teacher when ``teacher: shard``) is
    its own FSDP root -- the LightningModule is not wrapped, because a distillation step runs several backward
    passes inside one ``training_step`` and FSDP only finalises gradients for a root whose output was backpropagated
    (an ``auto_wrap_policy`` nests finer units, e.g. UNet blocks, inside each network);
  - the frozen teacher is sharded like the rest (``teacher: shard``) or kept whole on every rank outside FSDP
    (``teacher: replicate``, the default: no all-gather in the many teacher-only forward passes, at the cost of one
    full copy per rank);
  - per-optimizer gradient clipping by norm, which Lightning's FSDP precision plugin refuses (one global norm over
    the optimizer's gradient shards, all-reduced across ranks: the same number ``clip_grad_norm_`` gives unsharded);
  - CPU (gloo) as well as CUDA: Lightning only refuses ``strategy="fsdp"`` given as a string with a non-GPU
    accelerator; torch's FSDP itself runs on CPU, which is what the test suite uses.

Config (experiments/strategies/fsdp.yaml)::

    trainer:
      strategy:
        class_path: lightning_modules.strategies.DistillFSDP
        init_args: {teacher: replicate, sharding_strategy: FULL_SHARD}

The ``StudentEMA`` callback reads the student's full parameters through ``full_parameters`` (one all-gather per
generator update; the average itself is a full copy on every rank); see ``callbacks/ema.py``. Checkpoints with
``state_dict_type: full`` go through the strategy's CheckpointIO (atomic with ``callbacks.preemption``);
``sharded`` ones are folders written by torch.distributed.checkpoint (not atomic).
Tested on CPU with gloo (2 processes): parameters equal DDP's to float32 reduction noise, exact resume after a
signal; not run on GPUs here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

__all__ = ["DistillFSDP", "DistillFSDPPrecision", "agreed_draw", "bf16_supported", "default_precision",
           "full_parameters"]


def agreed_draw(module, draw: Callable[[], Any]) -> Any:
    """A random choice every rank must share (a backward-simulation step, a curriculum stage, a time bin): each rank
    calls ``draw()`` -- so the ranks' RNG streams advance alike -- and all take rank 0's value (one broadcast).
    Outside a trainer or with one process it is just ``draw()``."""
    value = draw()
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.world_size > 1:
        value = trainer.strategy.broadcast(value, src=0)
    return value


def bf16_supported(accelerator: str = "auto") -> bool:
    """Whether bf16 autocast is worth using: CUDA devices with bf16 support (Ampere and later), TPUs, and CPUs
    (bf16 autocast is correct on every CPU, fast only on those with AVX512-BF16/AMX)."""
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return True


def default_precision(accelerator: str = "auto") -> str:
    """``"bf16-mixed"`` where the device supports it, else ``"32-true"`` (for ``trainer.precision``)."""
    return "bf16-mixed" if bf16_supported(accelerator) else "32-true"


class DistillFSDPPrecision(FSDPPrecision):
    """FSDP precision for distillation modules.

    - clipping by norm over one optimizer's gradients (sharded across ranks; Lightning's plugin refuses it);
    - ``*-mixed``: parameters are gathered in the low precision, but gradients are reduced and buffers kept in float32
      and the networks' inputs are not cast -- noise levels and times stay float64 (the schedules' time math) and
      autocast, on the strategy's device type (CPU too; Lightning's plugin autocasts on CUDA only), picks the
      precision of each op."""

    #: set by DistillFSDP: the process group over which the gradient shards are spread (None: the default group)
    shard_group = None
    #: True when every rank holds full gradients (NO_SHARD): no all-reduce of the squared norm
    replicated_gradients = False
    #: set by DistillFSDP: where autocast runs
    device_type = "cuda"

    @property
    def mixed_precision_config(self):
        from torch.distributed.fsdp import MixedPrecision

        if "mixed" not in self.precision:
            return super().mixed_precision_config
        low = torch.bfloat16 if self.precision.startswith("bf16") else torch.float16
        return MixedPrecision(param_dtype=low, reduce_dtype=torch.float32, buffer_dtype=torch.float32,
                              cast_forward_inputs=False, cast_root_forward_inputs=False)

    def forward_context(self):
        if "mixed" in self.precision:
            low = torch.bfloat16 if self.precision.startswith("bf16") else torch.float16
            return torch.autocast(self.device_type, dtype=low)
        return super().forward_context()

    def clip_grad_by_norm(self, optimizer, clip_val: float | int, *args: Any, **kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        squared = torch.zeros((), dtype=torch.float64, device=device)
        for grad in grads:
            squared += grad.detach().double().pow(2).sum()
        if not self.replicated_gradients and dist.is_available() and dist.is_initialized():
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=self.shard_group)
        total = squared.sqrt()
        scale = (float(clip_val) / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale.to(grad.dtype))


def _network_slots(module: nn.Module, shard_teacher: bool) -> list[tuple[nn.Module, str, nn.Module]]:
    """(owner, attribute, network) for each network of a DistillationModule that becomes an FSDP root: the student,
    critic, discriminator head, a consistency target network (inside its AveragedModel), and the teacher if sharded.
    Networks without parameters are left alone."""
    slots = []
    for name in ("student", "critic", "discriminator", "target_student") + (("teacher",) if shard_teacher else ()):
        owner, attribute = module, name
        network = getattr(module, name, None)
        if name == "target_student" and isinstance(getattr(network, "module", None), nn.Module):
            owner, attribute, network = network, "module", network.module  # AveragedModel: wrap its network
        if isinstance(network, nn.Module) and any(True for _ in network.parameters()):
            slots.append((owner, attribute, network))
    return slots


class DistillFSDP(FSDPStrategy):
    """Lightning's FSDP with one unit per network, a sharded or replicated frozen teacher and per-optimizer clipping.

    teacher: ``replicate`` (default) keeps the frozen teacher outside FSDP, whole on every rank; ``shard`` makes it
        an FSDP unit (gathered for each teacher forward; for teachers too large for one device).
    The other arguments are Lightning's ``FSDPStrategy``'s (``sharding_strategy``, ``mixed_precision``,
    ``cpu_offload``, ``state_dict_type``, ...). ``use_orig_params`` is always on (optimizers over single networks,
    toggling ``requires_grad`` per optimizer).
    """

    strategy_name = "distill_fsdp"

    def __init__(self, *args: Any, teacher: Literal["replicate", "shard"] = "replicate", **kwargs: Any):
        if teacher not in ("replicate", "shard"):
            raise ValueError(f"teacher must be 'replicate' or 'shard', got {teacher!r}")
        kwargs["use_orig_params"] = True
        super().__init__(*args, **kwargs)
        self.teacher_mode = teacher

    @property
    def precision_plugin(self):
        plugin = self._precision_plugin
        if plugin is None or type(plugin) is FSDPPrecision:
            precision = "32-true" if plugin is None else plugin.precision
            plugin = DistillFSDPPrecision(precision)
            self._precision_plugin = plugin
        return plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = DistillFSDPPrecision(plugin.precision, getattr(plugin, "scaler", None))
        self._precision_plugin = plugin

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap each network as its own FSDP root; the LightningModule itself stays unwrapped.

        A distillation step runs several backward passes inside one ``training_step`` (manual optimization). FSDP
        finalises gradients (moves the reduced shard into ``.grad``) in a callback it queues from the *root's*
        pre-backward hook; with the whole module as root that hook never fires (training_step returns no tensor),
        so every network is a root of its own: its forward output carries the hook of the backward that uses it."""
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by the user (configure_model)
        if self.sharding_strategy in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
            raise NotImplementedError("DistillFSDP clips gradients over the whole world; HYBRID_SHARD is not "
                                      "supported (use FULL_SHARD, SHARD_GRAD_OP or NO_SHARD)")
        plugin = self.precision_plugin
        plugin.replicated_gradients = self.sharding_strategy == ShardingStrategy.NO_SHARD
        plugin.device_type = self.root_device.type
        for parameter in model.parameters():
            parameter.grad = None  # stale full-shaped gradients (e.g. from a warm start) cannot become shards
        units = _network_slots(model, shard_teacher=self.teacher_mode == "shard")
        # torch's FSDP reads device_id=None as "find an accelerator" and refuses CPU; an explicit device works on
        # both (CPU: gloo; CUDA: the rank's GPU).
        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        for owner, name, network in units:
            # an auto_wrap_policy (e.g. the UNet's block classes) nests finer units inside each network's root
            wrapped = FullyShardedDataParallel(module=network, cpu_offload=self.cpu_offload,
                                               mixed_precision=self.mixed_precision_config,
                                               sharding_strategy=self.sharding_strategy, device_id=device_id,
                                               **self.kwargs)
            _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
            setattr(owner, name, wrapped)
        model.to(self.root_device)  # what FSDP does not own (a replicated teacher, buffers)
        _move_torchmetrics_to_device(model, self.root_device)
        return model


@contextlib.contextmanager
def full_parameters(network: nn.Module, writeback: bool = False):
    """Yields ``network`` with full parameters: for an FSDP unit, the wrapped module while its parameters are
    gathered (collective: every rank must enter); any other module as it is. For reading a sharded student
    (EMA, export)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(network, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(network, writeback=writeback, recurse=True):
            yield network.module
    else:
        yield network
