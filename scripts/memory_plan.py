"""Memory budget per GPU for distribution-matching distillation (DMD2, SiD) of a text-to-image teacher.

    python scripts/memory_plan.py sdxl --method dmd2 --student full --critic full --gpus 8 --gradient-checkpointing
    python scripts/memory_plan.py flux --method sid --student lora --critic lora --lora-rank 64 --optimizer adamw8bit
    python scripts/memory_plan.py /models/my-sdxl-folder --json         # a local diffusers pipeline folder
    python scripts/memory_plan.py sdxl --grid method=dmd2,sid gpus=1,8,16 student+critic=full+full,lora+lora
                                                                         # a table of totals over option values

The source is a preset (``sd15``, ``sdxl``, ``flux``) or a local diffusers pipeline folder (model_index.json with
unet/ or transformer/, vae/, text encoders if present). Every network is built from its config on the ``meta``
device (``with torch.device("meta"): Model.from_config(config)``), so an SDXL- or Flux-size model costs no memory and
no weights are read; the presets carry the published backbone configs, so their counts are exact too, and each one's
published parameter count is kept beside it (with its source) and checked against the meta count.

What is counted, per GPU (all arithmetic is in the pure functions below; ``memory_plan()`` returns it as a dict):

* weights: the frozen teacher (real score) in ``--teacher-dtype``; the student and the fake critic either as full
  trainable copies (in the trainable dtype: fp32 "master" weights under ``bf16-mixed``, where autocast computes in
  bf16) or as LoRA adapters of rank r on the frozen teacher (peft's shapes: Linear r*(in+out), Conv2d
  r*in*kh*kw + out*r/groups, on the framework's default target layers; the adapters take the teacher's dtype, as peft
  builds them); the VAE (fp32, frozen); the text encoders only with ``--text-encoders-on-gpu`` (PromptDataModule's
  ``cache_dir`` keeps them off the accelerator); an EMA of the student with ``--ema``.
* gradients: one per trainable parameter in its dtype, for the student AND the critic: each optimizer's gradients
  stay allocated from its backward until its next ``zero_grad`` (``DistillationModule._update``), i.e. across the
  other network's phase.
* optimizer state, exactly as the optimizers allocate it: ``torch.optim.AdamW``: exp_avg + exp_avg_sq in the
  parameter's dtype (2 x 4 B for fp32 weights) + a float32 ``step`` tensor per parameter tensor;
  ``bitsandbytes.optim.AdamW8bit``: two uint8 states + two float32 absmax per block of 256 values
  (2 B + 8/256 B per value) for tensors with >= 4096 values (``min_8bit_size``), two float32 states (8 B per value)
  for smaller ones, plus its two 256-entry float32 quantisation maps, shared by all tensors (2 KiB).
* FSDP over N GPUs (``lightning_modules.strategies.DistillFSDP``, FULL_SHARD): the trainable networks' weights,
  gradients and optimizer states are divided by N (ceil); the frozen teacher too with ``--teacher-sharding shard``
  (``DistillFSDP(teacher="shard")``), else it is whole on every GPU (``teacher: replicate``, the default).
  Transient gathered weights: with a per-block ``auto_wrap_policy`` (``--fsdp-wrap block``, the default here) the
  unsharded bf16 copy of each FSDP network's top-level remainder (what no wrapped block owns; the root is not
  resharded between forward and backward) + 2 x its largest block (the one computing and the one prefetched) + one
  block's unsharded gradient; without a policy (``--fsdp-wrap network``: each network is one FSDP unit) the whole
  network is gathered while it holds activations.
* activations, per phase of a training step (see lightning_modules/methods/dmd2.py, sid.py, score_distillation.py):
    critic phase (both):  x_g = G(z) without grad; F(x_t) with grad into F            -> F holds activations (b)
    DMD2 generator phase: x_g = G(z) with grad; T (both CFG branches, 2b) and F without grad (the DM gradient is a
                          constant) -> only G holds activations (b)
    SiD generator phase:  x_g = G(z) with grad; x_t = x_g + sigma n keeps the path to x_g; T(x_t) (2b with CFG)
                          and F(x_t) are frozen but backpropagated INTO their input -> G (b), T (2b) and F (b) all
                          hold activations
  ESTIMATE. The bytes are those of the tensors autograd saves for backward in one forward of each network at that
  batch, counted by tracing the real diffusers model on the meta device (no compute) with
  ``torch.autograd.graph.saved_tensors_hooks`` (storages deduplicated, parameters excluded), attention counted as a
  fused kernel saves it (q, k, v, output and a float32 log-sum-exp; the math path's b*h*N*N matrices are not
  counted). This is the sum over layers of (batch x tokens_l x width_l x c_l bytes) for per-layer constants c_l; it
  is exactly linear in the batch, and about proportional to resolution^2 (tokens). With gradient checkpointing
  (diffusers' per-block checkpoints) it is: what is saved outside the checkpointed blocks + the block inputs the
  checkpoints keep + the largest single block's activations (recomputed during backward). Not counted: allocator
  fragmentation and caching, attention / cuDNN workspaces, the transient buffers of no-grad forwards, CUDA context
  (~0.5 GiB). The compute dtype is traced directly (autocast's float32 norms and softmax are not modelled).
  On a single GPU under ``bf16-mixed``, autocast's bf16 copies of fp32 weights are counted too: for weights that
  require grad autocast caches the copy until the end of ``training_step`` (Lightning wraps the whole step in one
  autocast region; the critic's cached copies are still there in the generator phase), and frozen fp32 weights that
  gradients pass through are cast again and kept for backward.
The total per GPU is the persistent part + the largest phase (critic, generator, or the EMA update, which gathers the
full student under FSDP).
Not modelled: DMD2's GAN head (a small classifier; with ``gan_generator_weight > 0`` the critic also holds
activations in the generator phase), the evaluation / sampling passes, CPU offload.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Iterable, Sequence

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GiB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("dmd2", "sid")
OPTIMIZERS = ("adamw", "adamw8bit")
PRECISIONS = ("bf16-mixed", "32")

#: bitsandbytes' Optimizer2State (0.50): tensors with fewer values keep 32-bit state; 8-bit state is quantised in
#: blocks of 256 values with one float32 absmax per block; the two 256-entry quantisation maps are shared tensors
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
BNB_QMAP_BYTES = 2 * 256 * 4

# ---------------------------------------------------------------------------------------------------------- presets
#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from diffusers' defaults)
SDXL_UNET = dict(addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
                 out_channels=4, layers_per_block=2, projection_class_embeddings_input_dim=2816, sample_size=128,
                 transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
#: runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], in_channels=4, out_channels=4,
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, sample_size=64)
#: black-forest-labs/FLUX.1-dev, transformer/config.json (diffusers' defaults are FLUX.1's; [dev] embeds guidance)
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
#: the SD / SDXL VAE (4 latent channels) and FLUX.1's (16 latent channels, no quant convs)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=512)
FLUX_VAE = dict(SD_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)

CLIP_L_TEXT = ("CLIP ViT-L/14 text encoder", 123_060_480)
OPENCLIP_BIGG_TEXT = ("OpenCLIP ViT-bigG/14 text encoder (with projection)", 694_659_840)
T5_XXL_ENCODER = ("T5-v1.1-XXL encoder", 4_762_310_656)


@dataclasses.dataclass(frozen=True)
class Preset:
    pipeline_class: str
    backbone_class: str
    backbone_config: dict
    #: the backbone's parameter count as published, and where
    published_parameters: int
    published_source: str
    vae_config: dict
    text_encoders: tuple
    resolution: int
    text_tokens: int


PRESETS = {
    "sd15": Preset("StableDiffusionPipeline", "UNet2DConditionModel", SD15_UNET, 860_000_000,
                   "Stable Diffusion v1 model card (CompVis / runwayml): '860M UNet and 123M text encoder' "
                   "(Rombach et al., CVPR 2022); exact: 859,520,964 from unet/config.json",
                   SD_VAE, (CLIP_L_TEXT,), 512, 77),
    "sdxl": Preset("StableDiffusionXLPipeline", "UNet2DConditionModel", SDXL_UNET, 2_600_000_000,
                   "SDXL (Podell et al. 2023, arXiv:2307.01952), Tab. 1: 2.6B UNet parameters; exact: "
                   "2,567,463,684 from stable-diffusion-xl-base-1.0 unet/config.json",
                   SD_VAE, (CLIP_L_TEXT, OPENCLIP_BIGG_TEXT), 1024, 77),
    "flux": Preset("FluxPipeline", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, 12_000_000_000,
                   "FLUX.1 (Black Forest Labs, Aug 2024; FLUX.1 [dev] model card): '12 billion parameter rectified "
                   "flow transformer'; exact: 11,901,408,320 from FLUX.1-dev transformer/config.json",
                   FLUX_VAE, (CLIP_L_TEXT, T5_XXL_ENCODER), 1024, 512),
}
#: published counts are rounded; the meta count of the config must agree to this relative tolerance
PUBLISHED_TOLERANCE = 0.02

#: FSDP blocks per backbone class (what ``auto_wrap_policy`` wraps; import paths in docs/scaling-text-to-image.md)
WRAP_CLASSES = {"UNet2DConditionModel": ("BasicTransformerBlock", "ResnetBlock2D"),
                "FluxTransformer2DModel": ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
                "SD3Transformer2DModel": ("JointTransformerBlock",),
                "PixArtTransformer2DModel": ("BasicTransformerBlock",)}
#: prompt tokens per pipeline (the encoders' defaults: CLIP 77; lightning_modules.conditioning.pipeline_encoders)
TEXT_TOKENS = {"StableDiffusionPipeline": 77, "StableDiffusionXLPipeline": 77, "StableDiffusion3Pipeline": 77 + 256,
               "PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300, "FluxPipeline": 512}
#: the Denoiser attribute that holds the backbone (LoRA target names are matched under it, as peft sees them)
BACKBONE_ATTRIBUTE = {"unet": "unet", "transformer": "transformer"}


# ---------------------------------------------------------------------------------------------------- architecture
class PlanError(ValueError):
    """A bad preset, folder or option; the message names it."""


@dataclasses.dataclass
class Architecture:
    """A teacher's networks as the planner needs them: configs, meta-device parameter counts, where they came from."""
    name: str
    kind: str                          # "preset" or "folder"
    pipeline_class: str | None
    backbone_subfolder: str            # "unet" or "transformer"
    backbone_class: str
    backbone_config: dict
    vae_class: str | None
    vae_config: dict | None
    text_encoders: dict                # name -> parameter count
    text_encoder_notes: list
    resolution: int
    text_tokens: int
    published_parameters: int | None = None
    published_source: str | None = None

    # -- the backbone on the meta device
    def build(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return _build_meta(self, dtype)

    @functools.cached_property
    def parameter_numels(self) -> list[int]:
        """One entry per parameter tensor of the backbone (the teacher, and a full student / critic copy)."""
        return [p.numel() for p in self.build().parameters()]

    @property
    def parameters(self) -> int:
        return sum(self.parameter_numels)

    @functools.cached_property
    def vae_parameters(self) -> int:
        if self.vae_config is None:
            return 0
        import diffusers

        cls = getattr(diffusers, self.vae_class or "AutoencoderKL")
        with _quiet(), torch.device("meta"):
            return sum(p.numel() for p in cls.from_config(self.vae_config).parameters())

    @property
    def vae_scale_factor(self) -> int:
        channels = (self.vae_config or {}).get("block_out_channels", [0] * 4)
        return 2 ** (len(channels) - 1)

    def lora_numels(self, rank: int, target_modules=None) -> list[int]:
        """Parameter tensors of LoRA adapters of ``rank`` on this backbone (the framework's default targets unless
        ``target_modules`` is given), as peft builds them."""
        return lora_parameter_numels(self.build(), rank, target_modules, self.default_lora_targets(),
                                     prefix=BACKBONE_ATTRIBUTE[self.backbone_subfolder] + ".")

    def default_lora_targets(self):
        """LoRACritic's defaults (lightning_modules.networks.lora.default_lora_targets): the listed attention /
        convolution / time-embedding layers for UNet2DConditionModel, every nn.Linear for any other backbone."""
        from lightning_modules.networks.lora import CONDITION_UNET_EXTRA_TARGETS, UNET_LORA_TARGETS

        if self.backbone_class == "UNet2DConditionModel":
            return list(UNET_LORA_TARGETS) + list(CONDITION_UNET_EXTRA_TARGETS)
        return None  # every nn.Linear

    @functools.cached_property
    def fsdp_units(self) -> dict:
        return fsdp_units(self.build(), WRAP_CLASSES.get(self.backbone_class, ()))


@contextlib.contextmanager
def _quiet():
    """diffusers warns on ``.to(bf16)`` of models built from configs; the planner only needs their shapes."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


_META_CACHE: dict = {}


def _build_meta(arch: Architecture, dtype: torch.dtype) -> nn.Module:
    """The backbone built from its config on the meta device (cached per architecture and dtype). Callers that
    change ``requires_grad`` or inject adapters must use ``_fresh_meta``."""
    key = (id(arch), dtype)
    if key not in _META_CACHE:
        _META_CACHE[key] = (arch, _fresh_meta(arch, dtype))
    return _META_CACHE[key][1]


def _fresh_meta(arch: Architecture, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, arch.backbone_class, None)
    if cls is None:
        raise PlanError(f"{arch.name}: backbone class {arch.backbone_class!r} is not in diffusers "
                        f"{diffusers.__version__}")
    with _quiet(), torch.device("meta"):
        model = cls.from_config(arch.backbone_config)
        if dtype != torch.float32:
            model = model.to(dtype)
    return model


def load_architecture(source: str) -> Architecture:
    """A preset name or a local diffusers pipeline folder; PlanError naming it otherwise."""
    if isinstance(source, Architecture):
        return source
    source = os.fspath(source)
    if source in PRESETS:
        return preset_architecture(source)
    if os.path.isdir(source):
        return folder_architecture(source)
    raise PlanError(f"{source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a local diffusers pipeline "
                    "folder (a directory with model_index.json)")


def preset_architecture(name: str) -> Architecture:
    if name not in PRESETS:
        raise PlanError(f"unknown preset {name!r}; the presets are {', '.join(sorted(PRESETS))} "
                        "(or give a local diffusers pipeline folder)")
    p = PRESETS[name]
    arch = Architecture(name=name, kind="preset", pipeline_class=p.pipeline_class,
                        backbone_subfolder="unet" if p.backbone_class.startswith("UNet") else "transformer",
                        backbone_class=p.backbone_class, backbone_config=dict(p.backbone_config),
                        vae_class="AutoencoderKL", vae_config=dict(p.vae_config),
                        text_encoders={label: count for label, count in p.text_encoders}, text_encoder_notes=[],
                        resolution=p.resolution, text_tokens=p.text_tokens,
                        published_parameters=p.published_parameters, published_source=p.published_source)
    return arch


def _read_json(path: str, what: str) -> dict:
    """The pipeline loader's own JSON reading (same messages), its errors as PlanError."""
    from lightning_modules.pipelines import _read_json as read_pipeline_json

    try:
        return read_pipeline_json(path, what)
    except (FileNotFoundError, ValueError) as error:
        raise PlanError(str(error)) from None


def folder_architecture(folder: str) -> Architecture:
    """The networks of a local diffusers pipeline folder, from their config.json files only (no weights read)."""
    if not os.path.isdir(folder):
        raise PlanError(f"pipeline folder {folder!r} does not exist (or is not a directory)")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise PlanError(f"{folder!r} is not a diffusers pipeline folder: it has no model_index.json")
    index = _read_json(os.path.join(folder, "model_index.json"), "pipeline index")
    subfolder = next((s for s in ("unet", "transformer") if s in index), None)
    if subfolder is None:
        raise PlanError(f"{folder}: model_index.json ({index.get('_class_name')!r}) has neither a unet nor a "
                        "transformer")
    entry = index[subfolder]
    backbone_class = entry[1] if isinstance(entry, list) and len(entry) == 2 else "UNet2DConditionModel"
    config = _read_json(os.path.join(folder, subfolder, "config.json"), f"{subfolder} config")
    vae_class, vae_config = None, None
    if "vae" in index and os.path.isfile(os.path.join(folder, "vae", "config.json")):
        vae_class = index["vae"][1] if isinstance(index["vae"], list) else "AutoencoderKL"
        vae_config = _read_json(os.path.join(folder, "vae", "config.json"), "VAE config")
    encoders, notes = {}, []
    for name in sorted(k for k in index if k.startswith("text_encoder")):
        entry = index[name]
        if not isinstance(entry, list) or entry[1] is None:
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(os.path.join(path, "config.json")):
            notes.append(f"{name}: listed in model_index.json but {path}/config.json is absent; not counted")
            continue
        try:
            encoders[f"{name} ({entry[1]})"] = _text_encoder_parameters(path, entry[1])
        except Exception as error:  # an unknown transformers class: say so rather than guess
            notes.append(f"{name} ({entry[1]}): could not be built from its config ({error}); not counted")
    pipeline = index.get("_class_name")
    scale = 2 ** (len((vae_config or {}).get("block_out_channels", [0] * 4)) - 1)
    size = config.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return Architecture(name=os.path.abspath(folder), kind="folder", pipeline_class=pipeline,
                        backbone_subfolder=subfolder, backbone_class=backbone_class, backbone_config=config,
                        vae_class=vae_class, vae_config=vae_config, text_encoders=encoders, text_encoder_notes=notes,
                        resolution=int(size) * scale, text_tokens=TEXT_TOKENS.get(pipeline, 77))


def _text_encoder_parameters(path: str, class_name: str) -> int:
    import transformers

    cls = getattr(transformers, class_name)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- pure arithmetic
def tensor_bytes(numels: Iterable[int], dtype: str) -> int:
    """Bytes of tensors with these element counts in ``dtype`` (fp32 / bf16 / fp16)."""
    return sum(numels) * DTYPE_BYTES[dtype]


def adamw_state_bytes(numels: Sequence[int], dtype: str) -> int:
    """torch.optim.AdamW's state after its first step: exp_avg and exp_avg_sq like the parameter (its dtype), and a
    float32 scalar ``step`` tensor per parameter tensor (non-capturable, non-fused default)."""
    return sum(2 * n * DTYPE_BYTES[dtype] + 4 for n in numels)


def adamw8bit_state_bytes(numels: Sequence[int], min_8bit_size: int = BNB_MIN_8BIT_SIZE,
                          blocksize: int = BNB_BLOCKSIZE) -> int:
    """bitsandbytes.optim.AdamW8bit's state after its first step (any parameter dtype): for a tensor of n values,
    n < min_8bit_size: two float32 states (8 n bytes); else two uint8 states + two float32 absmax per block
    (2 n + 8 ceil(n / blocksize)); plus the two shared 256-entry float32 quantisation maps once."""
    total, any_8bit = 0, False
    for n in numels:
        if n < min_8bit_size:
            total += 8 * n
        else:
            total += 2 * n + 8 * math.ceil(n / blocksize)
            any_8bit = True
    return total + (BNB_QMAP_BYTES if any_8bit else 0)


def optimizer_state_bytes(optimizer: str, numels: Sequence[int], dtype: str) -> int:
    if optimizer == "adamw":
        return adamw_state_bytes(numels, dtype)
    if optimizer == "adamw8bit":
        return adamw8bit_state_bytes(numels)
    raise PlanError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")


def shard(nbytes: int, gpus: int, sharded: bool = True) -> int:
    """Per-GPU bytes of a tensor set FSDP shards over ``gpus`` (flat parameters are padded to a multiple of N)."""
    return math.ceil(nbytes / gpus) if sharded and gpus > 1 else nbytes


def _matches(name: str, targets) -> bool:
    """peft's target rule (tuners_utils.check_target_module_exists): a string is a full regex match; a list matches
    a module whose name equals a target or ends with '.' + target."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def lora_parameter_numels(model: nn.Module, rank: int, target_modules=None, default_targets=None,
                          prefix: str = "") -> list[int]:
    """Element counts of the LoRA A and B matrices peft adds (lora_bias off): nn.Linear: A (r, in), B (out, r);
    nn.Conv2d: A (r, in, kh, kw), B (out, r / groups, 1, 1). ``target_modules=None`` takes ``default_targets``, and
    None there means every nn.Linear (LoRACritic's rule for networks that are not diffusers UNets)."""
    if rank < 1:
        raise PlanError(f"LoRA rank must be >= 1, got {rank}")
    targets = target_modules if target_modules is not None else default_targets
    numels = []
    for name, module in model.named_modules():
        if not name:
            continue
        full = prefix + name
        if targets is None:
            chosen = isinstance(module, nn.Linear)
        else:
            chosen = _matches(full, targets)
        if not chosen:
            continue
        if isinstance(module, nn.Linear):
            numels += [rank * module.in_features, module.out_features * rank]
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            numels += [rank * module.in_channels * kh * kw, module.out_channels * rank // module.groups]
        else:
            raise PlanError(f"LoRA target {full!r} is a {type(module).__name__}; peft adapts nn.Linear / nn.Conv2d "
                            "here")
    if not numels:
        raise PlanError(f"LoRA targets {targets!r} match no layer of {type(model).__name__}")
    return numels


def fsdp_units(model: nn.Module, wrap_classes: Sequence[str]) -> dict:
    """Parameter counts of the FSDP units a per-block ``auto_wrap_policy`` makes: the outermost modules whose class
    name is in ``wrap_classes`` (largest of them) and the root's remainder (parameters no wrapped block owns)."""
    blocks = []

    def visit(module):
        for child in module.children():
            if type(child).__name__ in wrap_classes:
                blocks.append(sum(p.numel() for p in child.parameters()))
            else:
                visit(child)

    visit(model)
    total = sum(p.numel() for p in model.parameters())
    return {"blocks": len(blocks), "largest_block": max(blocks, default=0), "remainder": total - sum(blocks),
            "total": total}


# ----------------------------------------------------------------------------------------------- activation trace
class _FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention in the trace: saves what a fused (flash / memory-efficient)
    kernel saves for backward -- q, k, v, the output and a float32 log-sum-exp per query (+ the mask, if any)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(*([q, k, v, out, lse] + ([mask] if mask is not None else [])))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    mask = attn_mask if torch.is_tensor(attn_mask) else None
    return _FusedAttention.apply(query, key, value, mask)


class _SavedTensors:
    def __init__(self, model: nn.Module):
        self.parameters = {p.untyped_storage()._cdata for p in model.parameters()}
        self.stack: list[dict] = [{}]
        self.block_inputs: dict = {}
        self.largest_block = 0
        #: every counted tensor, kept alive for the trace: a freed storage's address could be reused by a new one
        self.alive: list = []

    def _key(self, t):
        return t.untyped_storage()._cdata

    def pack(self, t):
        key = self._key(t)
        if key not in self.parameters:
            self.alive.append(t)
            saved = self.stack[-1]
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    def checkpoint(self, module, *args):
        """diffusers' ``gradient_checkpointing_func`` in the trace: the checkpoint keeps its tensor inputs; inside,
        the block's own saved tensors are counted separately (they exist only while it is recomputed)."""
        for a in args:
            if torch.is_tensor(a) and self._key(a) not in self.parameters:
                self.alive.append(a)
                self.block_inputs[self._key(a)] = a.untyped_storage().nbytes()
        self.stack.append({})
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            out = module(*args)
        self.largest_block = max(self.largest_block, sum(self.stack.pop().values()))
        return out


def backbone_inputs(arch: Architecture, model: nn.Module, batch: int, resolution: int, text_tokens: int,
                    dtype: torch.dtype, device="meta", input_grad: bool = False) -> dict:
    """Keyword inputs of one backbone call on ``batch`` samples at ``resolution`` pixels, as the framework's
    Denoisers pass them (latent = resolution / VAE scale factor; Flux packs 2x2 latent patches into tokens)."""
    cfg = model.config
    latent = resolution // arch.vae_scale_factor
    if latent < 1:
        raise PlanError(f"resolution {resolution} is below the VAE scale factor {arch.vae_scale_factor}")
    kw = dict(dtype=dtype, device=device)
    cls = arch.backbone_class
    if cls == "UNet2DConditionModel":
        x = torch.randn(batch, cfg.in_channels, latent, latent, **kw)
        cross = cfg.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        inputs = dict(sample=x, timestep=torch.full((batch,), 500.0, **kw),
                      encoder_hidden_states=torch.randn(batch, text_tokens, cross, **kw))
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, **kw),
                                           "time_ids": torch.randn(batch, 6, **kw)}
        elif cfg.addition_embed_type is not None:
            raise PlanError(f"UNet addition_embed_type {cfg.addition_embed_type!r} is not traced by the planner")
        if cfg.time_cond_proj_dim:
            inputs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, **kw)
        key = "sample"
    elif cls == "FluxTransformer2DModel":
        side = latent // 2
        tokens = side * side
        inputs = dict(hidden_states=torch.randn(batch, tokens, cfg.in_channels, **kw),
                      encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, **kw),
                      pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, **kw),
                      timestep=torch.full((batch,), 0.5, **kw), img_ids=torch.zeros(tokens, 3, **kw),
                      txt_ids=torch.zeros(text_tokens, 3, **kw))
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, **kw)
        key = "hidden_states"
    elif cls == "SD3Transformer2DModel":
        inputs = dict(hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, **kw),
                      encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, **kw),
                      pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, **kw),
                      timestep=torch.full((batch,), 500.0, **kw))
        key = "hidden_states"
    elif cls == "PixArtTransformer2DModel":
        extra = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):
            extra = {"resolution": torch.full((batch, 2), float(resolution), **kw),
                     "aspect_ratio": torch.ones(batch, 1, **kw)}
        inputs = dict(hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, **kw),
                      encoder_hidden_states=torch.randn(batch, text_tokens, cfg.caption_channels, **kw),
                      timestep=torch.full((batch,), 500.0, **kw), added_cond_kwargs=extra)
        key = "hidden_states"
    else:
        raise PlanError(f"activations of {cls} are not traced by the planner (UNet2DConditionModel, "
                        "FluxTransformer2DModel, SD3Transformer2DModel, PixArtTransformer2DModel are)")
    if input_grad:
        inputs[key].requires_grad_(True)
    return inputs


def saved_activation_bytes(model: nn.Module, inputs: dict, checkpointing: bool = False) -> dict:
    """Bytes of the tensors autograd keeps for backward after one forward of ``model`` on ``inputs`` (parameters
    excluded, storages counted once). With ``checkpointing`` (diffusers' per-block gradient checkpointing):
    ``outside`` + ``block_inputs`` stay until backward, ``largest_block`` is live while that block is recomputed.
    Works on the meta device (shapes only) and on real tensors alike."""
    counter = _SavedTensors(model)
    if checkpointing:
        if not getattr(model, "_supports_gradient_checkpointing", False):
            raise PlanError(f"{type(model).__name__} does not support gradient checkpointing")
        model.enable_gradient_checkpointing(counter.checkpoint)
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(**inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        if checkpointing:
            model.disable_gradient_checkpointing()
    outside = counter.stack[0]
    block_inputs = sum(v for k, v in counter.block_inputs.items() if k not in outside)
    outside_bytes = sum(outside.values())
    return {"outside": outside_bytes, "block_inputs": block_inputs, "largest_block": counter.largest_block,
            "total": outside_bytes + block_inputs + counter.largest_block}


_TRACE_CACHE: dict = {}


def trace_network(arch: Architecture, mode: str, batch: int, resolution: int, text_tokens: int, dtype: str,
                  checkpointing: bool, lora_rank: int | None = None, lora_targets=None) -> dict:
    """Saved-for-backward bytes of one network forward (``saved_activation_bytes``'s dict), on the meta device.
    mode: ``trainable`` (weights / adapters take gradients, the input does not: the student on noise, the critic on
    a detached x_t) or ``input_grad`` (frozen, backpropagated into its input: SiD's teacher and critic). With
    ``lora_rank`` the network is the backbone with peft LoRA layers injected (frozen base, trainable adapters)."""
    key = (id(arch), mode, batch, resolution, text_tokens, dtype, checkpointing, lora_rank,
           None if lora_targets is None else tuple(lora_targets) if not isinstance(lora_targets, str) else lora_targets)
    if key in _TRACE_CACHE:
        return _TRACE_CACHE[key][1]
    model = _fresh_meta(arch, TORCH_DTYPES[dtype])
    model.requires_grad_(mode == "trainable" and lora_rank is None)
    if lora_rank is not None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_targets if lora_targets is not None else arch.default_lora_targets()
        if targets is None:
            targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets), model,
                                adapter_name="student")
        for name, p in model.named_parameters():
            p.requires_grad_(mode == "trainable" and "lora_" in name)
    inputs = backbone_inputs(arch, model, batch, resolution, text_tokens, TORCH_DTYPES[dtype],
                             input_grad=mode == "input_grad")
    with _quiet():
        counted = saved_activation_bytes(model, inputs, checkpointing)
    _TRACE_CACHE[key] = (arch, counted)
    return dict(counted)


# ----------------------------------------------------------------------------------------------------- the plan
def _dtype_name(value: str, what: str) -> str:
    aliases = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "fp32": "fp32",
               "float32": "fp32", "32": "fp32"}
    if value not in aliases:
        raise PlanError(f"{what} must be one of bf16 / fp16 / fp32, got {value!r}")
    return aliases[value]


def memory_plan(source, *, method: str = "dmd2", student: str = "full", critic: str = "full", lora_rank: int = 64,
                lora_targets=None, optimizer: str = "adamw", teacher_dtype: str = "bf16",
                precision: str = "bf16-mixed", trainable_dtype: str = "auto", gradient_checkpointing: bool = False,
                gpus: int = 1, teacher_sharding: str = "replicate", fsdp_wrap: str = "block", batch_size: int = 1,
                resolution: int | None = None, text_tokens: int | None = None, guidance: bool = True,
                ema: bool = False, vae: bool = True, text_encoders_on_gpu: bool = False,
                activations: bool = True) -> dict:
    """The per-GPU memory budget (bytes) of one DMD2 / SiD configuration; see the module docstring for the model.

    ``source``: a preset name, a pipeline folder or an ``Architecture``. ``batch_size`` is per GPU.
    ``trainable_dtype``: the weights of full students / critics and of LoRA adapters; ``auto``: fp32 for full
    networks (master weights; autocast computes in bf16 under ``bf16-mixed``) and the teacher's dtype for LoRA
    adapters (peft builds them in their base layer's dtype). ``guidance``: the teacher runs both CFG branches in one
    call (2 x batch), as with guidance_scale != 1. Returns {"components": [...], "phases": {...}, "total": ...}.
    """
    arch = load_architecture(source)
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; expected one of {METHODS}")
    for name, value in (("student", student), ("critic", critic)):
        if value not in ("full", "lora"):
            raise PlanError(f"{name} must be 'full' or 'lora', got {value!r}")
    if optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if teacher_sharding not in ("replicate", "shard"):
        raise PlanError(f"teacher_sharding must be 'replicate' or 'shard', got {teacher_sharding!r}")
    if fsdp_wrap not in ("block", "network"):
        raise PlanError(f"fsdp_wrap must be 'block' or 'network', got {fsdp_wrap!r}")
    if gpus < 1 or batch_size < 1:
        raise PlanError(f"gpus and batch_size must be >= 1, got {gpus} and {batch_size}")
    teacher_dtype = _dtype_name(teacher_dtype, "teacher_dtype")
    full_dtype = "fp32" if trainable_dtype == "auto" else _dtype_name(trainable_dtype, "trainable_dtype")
    lora_dtype = teacher_dtype if trainable_dtype == "auto" else full_dtype
    compute = "bf16" if precision == "bf16-mixed" else None  # None: each network computes in its weights' dtype
    resolution = arch.resolution if resolution is None else int(resolution)
    text_tokens = arch.text_tokens if text_tokens is None else int(text_tokens)
    fsdp = gpus > 1
    teacher_sharded = fsdp and teacher_sharding == "shard"

    teacher_numels = arch.parameter_numels
    teacher_params = sum(teacher_numels)
    lora_numels = arch.lora_numels(lora_rank, lora_targets) if "lora" in (student, critic) else []
    nets = {}
    for name, kind in (("student", student), ("critic", critic)):
        numels = lora_numels if kind == "lora" else teacher_numels
        dtype = lora_dtype if kind == "lora" else full_dtype
        nets[name] = dict(kind=kind, numels=numels, dtype=dtype, params=sum(numels))

    components = []

    def add(name, nbytes, group, detail=""):
        components.append({"component": name, "bytes": int(nbytes), "group": group, "detail": detail})

    placement = "sharded" if teacher_sharded else "replicated" if fsdp else "one GPU"
    add(f"frozen teacher (real score) weights, {teacher_dtype}, {placement}",
        shard(tensor_bytes(teacher_numels, teacher_dtype), gpus, teacher_sharded), "weights",
        f"{teacher_params:,} parameters")
    optimizer_label = "AdamW 32-bit" if optimizer == "adamw" else "AdamW8bit"
    for name in ("student", "critic"):
        net = nets[name]
        label = "student" if name == "student" else "fake critic"
        if net["kind"] == "full":
            what = (f"{label} weights, full copy, {net['dtype']}"
                    + (" (master weights; bf16 compute)" if net["dtype"] == "fp32" and compute == "bf16" else ""))
        else:
            what = f"{label} LoRA adapters r={lora_rank}, {net['dtype']} (base: the frozen teacher)"
        add(what, shard(tensor_bytes(net["numels"], net["dtype"]), gpus, fsdp), "weights",
            f"{net['params']:,} trainable parameters")
        add(f"{label} gradients, {net['dtype']}", shard(tensor_bytes(net["numels"], net["dtype"]), gpus, fsdp),
            "gradients")
        add(f"{label} optimizer state, {optimizer_label}",
            shard(optimizer_state_bytes(optimizer, net["numels"], net["dtype"]), gpus, fsdp), "optimizer")
    if ema:
        ema_bytes = tensor_bytes(nets["student"]["numels"], nets["student"]["dtype"])
        detail = "AveragedModel copy, whole on every rank"
        if student == "lora":
            detail += "; of a LoRA student: its adapters only (the copy shares the teacher)"
        add("student EMA", ema_bytes, "weights", detail)
    if vae and arch.vae_config is not None:
        add("VAE, fp32, frozen", tensor_bytes([arch.vae_parameters], "fp32"), "weights",
            f"{arch.vae_parameters:,} parameters")
    text_params = sum(arch.text_encoders.values())
    if text_encoders_on_gpu and text_params:
        add(f"text encoders, {teacher_dtype}, frozen", tensor_bytes([text_params], teacher_dtype), "weights",
            ", ".join(f"{k}: {v:,}" for k, v in arch.text_encoders.items()))
    persistent = sum(c["bytes"] for c in components)

    # ---------------------------------------------------------------- phases: activations and compute copies
    teacher_batch = 2 * batch_size if guidance else batch_size
    phase_entries = {"critic": [("critic", "trainable", batch_size)],
                     "generator": [("student", "trainable", batch_size)]}
    if method == "sid":
        phase_entries["generator"] += [("teacher", "input_grad", teacher_batch), ("critic", "input_grad", batch_size)]
    no_grad = {"critic": ["student"], "generator": [] if method == "sid" else ["teacher", "critic"]}

    def weights_dtype(name):
        return teacher_dtype if name == "teacher" else nets[name]["dtype"]

    def trace_dtype(name):
        if compute:
            return compute
        if name != "teacher" and nets[name]["kind"] == "lora":
            return teacher_dtype
        return weights_dtype(name)

    def fsdp_network(name):
        """Is this network's bulk an FSDP unit (sharded, gathered per block)?"""
        if not fsdp:
            return False
        if name == "teacher":
            return teacher_sharded
        return nets[name]["kind"] == "full"

    def bulk_dtype(name):
        """dtype of the weights the network's forward multiplies with (a LoRA network: its base, the teacher)."""
        return teacher_dtype if name == "teacher" or nets[name]["kind"] == "lora" else nets[name]["dtype"]

    phases = {}
    for phase, entries in phase_entries.items():
        rows, recompute = [], 0
        for name, mode, batch in entries:
            if not activations:
                break
            kind = "full" if name == "teacher" else nets[name]["kind"]
            rank = lora_rank if kind == "lora" else None
            counted = trace_network(arch, mode, batch, resolution, text_tokens, trace_dtype(name),
                                    gradient_checkpointing, rank, lora_targets)
            label = {"student": "student G", "teacher": "teacher T", "critic": "critic F"}[name]
            how = "grad into weights" if mode == "trainable" else "frozen, grad into its input"
            kept = counted["outside"] + counted["block_inputs"]
            rows.append({"component": f"{phase} phase: activations of {label} (batch {batch}, {how})"
                                      + (", checkpoint inputs" if gradient_checkpointing else ""),
                         "bytes": kept, "group": "activations", "detail": "estimate"})
            recompute = max(recompute, counted["largest_block"])
        if recompute:
            # backward recomputes one checkpointed block at a time, whichever network it is in
            rows.append({"component": f"{phase} phase: activations of the largest block, recomputed in backward",
                         "bytes": recompute, "group": "activations", "detail": "estimate"})
        # compute copies of weights
        copies, detail = 0, []
        with_grad = list(dict.fromkeys(n for n, _, _ in entries))
        if fsdp:
            units = arch.fsdp_units
            gather = DTYPE_BYTES[compute] if compute else 4
            sharded_grad = [n for n in with_grad if fsdp_network(n)]
            sharded_nograd = [n for n in no_grad[phase] if fsdp_network(n)]
            if sharded_grad or sharded_nograd:
                if fsdp_wrap == "block":
                    # each root's remainder stays gathered from its forward to its backward; blocks come and go
                    copies += len(sharded_grad + sharded_nograd[:1]) * units["remainder"] * gather
                    copies += 2 * units["largest_block"] * gather
                    if any(nets[n]["kind"] == "full" for n in sharded_grad if n != "teacher"
                           and (n, "trainable") in [(e[0], e[1]) for e in entries]):
                        copies += units["largest_block"] * gather      # one block's unsharded gradient
                    detail.append(f"FSDP gathers ({', '.join(sharded_grad + sharded_nograd)}): remainder "
                                  f"{units['remainder']:,} params per network + 2 x largest block "
                                  f"{units['largest_block']:,}")
                else:
                    copies += (len(sharded_grad) + (1 if sharded_nograd else 0)) * units["total"] * gather
                    detail.append(f"FSDP gathers whole networks ({', '.join(sharded_grad + sharded_nograd)})")
        if compute:
            # autocast's bf16 copies of weights in another dtype, kept for backward (see the module docstring). The
            # bulk of every network here is a backbone of the teacher's size (a LoRA network's: the teacher itself).
            cast = [n for n in with_grad if not fsdp_network(n) and bulk_dtype(n) != compute]
            if phase == "generator" and nets["critic"]["kind"] == "full" and not fsdp_network("critic") \
                    and nets["critic"]["dtype"] != compute:
                cast.append("critic (cached since the critic phase)")
            copies += len(cast) * teacher_params * DTYPE_BYTES[compute]
            if cast:
                detail.append(f"autocast {compute} copies of {', '.join(cast)}")
        if copies:
            rows.append({"component": f"{phase} phase: compute copies of weights", "bytes": copies,
                         "group": "compute copies", "detail": "; ".join(detail) + " (estimate)"})
        phases[phase] = {"rows": rows, "bytes": sum(r["bytes"] for r in rows)}
    if ema and fsdp and student == "full":
        gathered = tensor_bytes(nets["student"]["numels"], nets["student"]["dtype"])
        phases["ema update"] = {"rows": [{"component": "EMA update: the student gathered whole (full_parameters)",
                                          "bytes": gathered, "group": "compute copies", "detail": "transient"}],
                                "bytes": gathered}
    peak_phase = max(phases, key=lambda p: phases[p]["bytes"])
    total = persistent + phases[peak_phase]["bytes"]

    notes = []
    if arch.published_parameters:
        relative = abs(teacher_params - arch.published_parameters) / arch.published_parameters
        notes.append(f"backbone: {teacher_params:,} parameters from its config on the meta device; published: "
                     f"{arch.published_source}" + ("" if relative <= PUBLISHED_TOLERANCE else
                                                   f" -- MISMATCH ({relative:.1%})"))
    if text_params and not text_encoders_on_gpu:
        notes.append(f"text encoders ({', '.join(f'{k}: {v:,}' for k, v in arch.text_encoders.items())}; "
                     f"{tensor_bytes([text_params], teacher_dtype) / GiB:.2f} GiB in {teacher_dtype}) are not "
                     "counted: PromptDataModule(cache_dir=...) encodes the prompts once, off the accelerator "
                     "(--text-encoders-on-gpu counts them)")
    notes += arch.text_encoder_notes
    if "lora" in (student, critic) and teacher_sharded:
        notes.append("LoRA networks run the teacher's own layers outside the teacher's FSDP unit; with "
                     "DistillFSDP(teacher='shard') those weights are not gathered for them -- keep teacher: replicate "
                     "with LoRA (this combination is not tested)")
    if student == "lora" and critic == "full":
        notes.append("a full critic next to a LoRA student: in the framework DMD2/SiD copy the critic from the student "
                     "(copy.deepcopy), so with student_lora the critic is a LoRA network too; pass critic= explicitly")
    if student == "full" and critic == "lora":
        notes.append("a LoRA critic on the shared teacher next to a full student: DMD2/SiD have no option that builds "
                     "it (VSD's critic_base: teacher does); a critic: LoRACritic given in the config gets its own base "
                     "network, i.e. one more frozen teacher copy, which this plan does not count")
    if student == "lora" and critic == "lora":
        notes.append("with student_lora, DMD2/SiD's critic is a copy of the LoRA student: its own adapters on the same "
                     "shared teacher (LoRACritic.__deepcopy__ keeps the base shared), as this plan counts")
    if trainable_dtype == "auto" and student == "full" and teacher_dtype != "fp32":
        notes.append(f"fp32 master weights for full networks: the framework's default student/critic are copies of "
                     f"the teacher, i.e. {teacher_dtype}; give student:/critic: as fp32 networks (LatentTeacher with "
                     f"torch_dtype null) or plan --trainable-dtype {teacher_dtype} for pure-{teacher_dtype} weights "
                     "and optimizer moments")
    if not activations:
        notes.append("activations not estimated (activations=False)")
    return {
        "source": arch.name, "kind": arch.kind, "pipeline_class": arch.pipeline_class,
        "backbone": arch.backbone_class, "backbone_parameters": teacher_params,
        "options": dict(method=method, student=student, critic=critic, lora_rank=lora_rank,
                        lora_targets=lora_targets, optimizer=optimizer, teacher_dtype=teacher_dtype,
                        precision=precision, trainable_dtype=dict(full=full_dtype, lora=lora_dtype),
                        gradient_checkpointing=gradient_checkpointing, gpus=gpus, teacher_sharding=teacher_sharding,
                        fsdp_wrap=fsdp_wrap, batch_size=batch_size, resolution=resolution, text_tokens=text_tokens,
                        guidance=guidance, ema=ema, vae=vae, text_encoders_on_gpu=text_encoders_on_gpu),
        "trainable_parameters": {n: nets[n]["params"] for n in nets},
        "components": components, "persistent": persistent,
        "phases": {k: {"bytes": v["bytes"], "rows": v["rows"]} for k, v in phases.items()},
        "peak_phase": peak_phase, "total": total, "notes": notes,
    }


def component_bytes(plan: dict, startswith: str) -> int:
    """The bytes of the one component whose name starts with ``startswith`` (for tests and the doc)."""
    rows = [c for c in plan["components"] if c["component"].startswith(startswith)]
    if len(rows) != 1:
        raise KeyError(f"{len(rows)} components start with {startswith!r}")
    return rows[0]["bytes"]


# ----------------------------------------------------------------------------------------------------------- output
def markdown(plan: dict) -> str:
    o = plan["options"]
    lines = [f"**{os.path.basename(plan['source']) if plan['kind'] == 'folder' else plan['source']}** "
             f"({plan['backbone']}, {plan['backbone_parameters'] / 1e9:.2f}B) -- {o['method'].upper()}, "
             f"student {o['student']}, critic {o['critic']}"
             + (f" (LoRA r={o['lora_rank']})" if "lora" in (o["student"], o["critic"]) else "")
             + f", {o['optimizer']}, teacher {o['teacher_dtype']}, {o['precision']}, "
             f"{'gradient checkpointing' if o['gradient_checkpointing'] else 'no checkpointing'}, "
             f"{o['gpus']} GPU(s)" + (f" (FSDP, teacher {o['teacher_sharding']})" if o["gpus"] > 1 else "")
             + f", batch {o['batch_size']}/GPU at {o['resolution']} px", "",
             "| component | bytes | GiB |", "|---|---:|---:|"]
    for c in plan["components"]:
        lines.append(f"| {c['component']} | {c['bytes']:,} | {c['bytes'] / GiB:.2f} |")
    lines.append(f"| *persistent subtotal* | {plan['persistent']:,} | {plan['persistent'] / GiB:.2f} |")
    for phase, info in plan["phases"].items():
        for r in info["rows"]:
            lines.append(f"| {r['component']} | {r['bytes']:,} | {r['bytes'] / GiB:.2f} |")
        mark = " (peak)" if phase == plan["peak_phase"] else ""
        lines.append(f"| *{phase} phase subtotal{mark}* | {info['bytes']:,} | {info['bytes'] / GiB:.2f} |")
    lines.append(f"| **total per GPU** (persistent + {plan['peak_phase']} phase) | **{plan['total']:,}** | "
                 f"**{plan['total'] / GiB:.2f}** |")
    if plan["notes"]:
        lines.append("")
        lines += [f"- {n}" for n in plan["notes"]]
    return "\n".join(lines)


def parse_grid(items: Sequence[str]) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """``KEY=V1,V2`` (a ``memory_plan`` keyword, dashes allowed) or ``KEY1+KEY2=A1+A2,B1+B2`` (options varied
    together) -> [(keys, [values, ...]), ...] with values typed like the keyword's default."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(memory_plan).parameters.items() if k != "source"}

    def typed(key, text):
        default = defaults[key]
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise PlanError(f"grid value {text!r} of {key} is not a boolean")
            return text.lower() in ("true", "yes", "1")
        if isinstance(default, int) or key == "resolution" or key == "text_tokens":
            return int(text)
        return text

    axes = []
    for item in items:
        if "=" not in item:
            raise PlanError(f"grid axis {item!r} is not KEY=V1,V2,...")
        left, right = item.split("=", 1)
        keys = tuple(k.replace("-", "_") for k in left.split("+"))
        unknown = [k for k in keys if k not in defaults]
        if unknown:
            raise PlanError(f"grid key(s) {unknown} are not memory_plan options ({', '.join(sorted(defaults))})")
        values = []
        for group in right.split(","):
            parts = group.split("+")
            if len(parts) != len(keys):
                raise PlanError(f"grid value {group!r} does not give one value per key of {left!r}")
            values.append(tuple(typed(k, v) for k, v in zip(keys, parts)))
        axes.append((keys, values))
    return axes


def grid_plans(source, axes, **fixed) -> list[tuple[dict, dict]]:
    """One plan per combination of the axes (``parse_grid``), the other options from ``fixed``."""
    import itertools

    arch = load_architecture(source)
    rows = []
    for combo in itertools.product(*[values for _, values in axes]):
        options = dict(fixed)
        for (keys, _), values in zip(axes, combo):
            options.update(zip(keys, values))
        rows.append((options, memory_plan(arch, **options)))
    return rows


def grid_markdown(rows, axes) -> str:
    keys = [k for ks, _ in axes for k in ks]

    def show(value):
        return ("yes" if value else "no") if isinstance(value, bool) else str(value)

    lines = ["| " + " | ".join(k.replace("_", " ") for k in keys)
             + " | persistent (GiB) | peak phase | activations (GiB) | compute copies (GiB) "
               "| **total per GPU (GiB)** |",
             "|" + "---|" * len(keys) + "---:|---|---:|---:|---:|"]
    for options, plan in rows:
        peak = plan["phases"][plan["peak_phase"]]["rows"]
        acts = sum(r["bytes"] for r in peak if r["group"] == "activations")
        copies = sum(r["bytes"] for r in peak if r["group"] == "compute copies")
        lines.append("| " + " | ".join(show(options.get(k)) for k in keys)
                     + f" | {plan['persistent'] / GiB:.1f} | {plan['peak_phase']} | {acts / GiB:.1f} | "
                       f"{copies / GiB:.1f} | **{plan['total'] / GiB:.1f}** |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help=f"a preset ({', '.join(sorted(PRESETS))}) or a local pipeline folder")
    p.add_argument("--preset", help="a preset name (instead of SOURCE)")
    p.add_argument("--pipeline", help="a local diffusers pipeline folder (instead of SOURCE)")
    p.add_argument("--method", choices=METHODS, default="dmd2")
    p.add_argument("--student", choices=("full", "lora"), default="full")
    p.add_argument("--critic", choices=("full", "lora"), default="full")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-targets", nargs="+", help="peft target_modules (default: the framework's LoRA targets)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--teacher-dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    p.add_argument("--trainable-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--gpus", type=int, default=1, help="FSDP over this many GPUs (1: no sharding)")
    p.add_argument("--teacher-sharding", choices=("replicate", "shard"), default="replicate")
    p.add_argument("--fsdp-wrap", choices=("block", "network"), default="block")
    p.add_argument("--batch-size", type=int, default=1, help="per GPU")
    p.add_argument("--resolution", type=int, help="pixels (default: the model's native resolution)")
    p.add_argument("--text-tokens", type=int, help="prompt tokens (default: the pipeline's)")
    p.add_argument("--no-guidance", action="store_true", help="teacher without CFG (guidance_scale 1: batch, not 2x)")
    p.add_argument("--ema", action="store_true", help="count a StudentEMA copy")
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--text-encoders-on-gpu", action="store_true")
    p.add_argument("--no-activations", action="store_true")
    p.add_argument("--grid", nargs="+", metavar="KEY=V1,V2",
                   help="a table of totals over these option values, e.g. gpus=1,8,16 student+critic=full+full,lora+lora"
                        " (keys: memory_plan's keywords; the other options as given)")
    p.add_argument("--json", action="store_true", help="print the plan (or the grid's plans) as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = [s for s in (args.source, args.preset, args.pipeline) if s is not None]
    if len(given) != 1:
        print("memory_plan: give exactly one of SOURCE, --preset, --pipeline", file=sys.stderr)
        return 2
    try:
        if args.preset is not None:
            source = preset_architecture(args.preset)
        elif args.pipeline is not None:
            source = folder_architecture(args.pipeline)
        else:
            source = load_architecture(args.source)
        options = dict(method=args.method, student=args.student, critic=args.critic, lora_rank=args.lora_rank,
                       lora_targets=args.lora_targets, optimizer=args.optimizer, teacher_dtype=args.teacher_dtype,
                       precision=args.precision, trainable_dtype=args.trainable_dtype,
                       gradient_checkpointing=args.gradient_checkpointing, gpus=args.gpus,
                       teacher_sharding=args.teacher_sharding, fsdp_wrap=args.fsdp_wrap, batch_size=args.batch_size,
                       resolution=args.resolution, text_tokens=args.text_tokens, guidance=not args.no_guidance,
                       ema=args.ema, vae=not args.no_vae, text_encoders_on_gpu=args.text_encoders_on_gpu,
                       activations=not args.no_activations)
        if args.grid:
            axes = parse_grid(args.grid)
            rows = grid_plans(source, axes, **options)
            print(json.dumps([plan for _, plan in rows], indent=2) if args.json else grid_markdown(rows, axes))
            return 0
        plan = memory_plan(source, **options)
    except PlanError as error:
        print(f"memory_plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else markdown(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
