"""SNOOPI -- Supercharged One-step Diffusion Distillation with Proper Guidance (Nguyen et al. 2024, arXiv:2412.02687
v1; v3 of the same arXiv id, "Supercharged One-step Text-to-Image Diffusion Models with Negative Prompts", ICCV 2025,
keeps NASA).

Two parts, both on top of VSD / SwiftBrush (``vsd.py``):

PG-SB (Proper Guidance - SwiftBrush): SwiftBrush guides the teacher and the LoRA critic with one
fixed CFG scale; PG-SB draws the scale at random for every training step and applies it to BOTH networks,
    w ~ U[w_min, w_max];   g = w_x0(t) (F^w(x_t, y) - T^w(x_t, y)),   D^w = D(., null) + w (D(., y) - D(., null)),
which broadens the range of guided targets and stabilises training across backbones. The critic is conditional and
learns its null-label branch from label dropout (VSD's ``critic_label_dropout``); the null label is the teacher's
``num_classes`` as in ``DistillationModule.teacher_x0``. With an exact critic the fixed point stays p_G(x|y) = p(x|y)
for every w (the guided difference w (s(x|y) - s_G(x|y)) + (1 - w)(s(x) - s_G(x)) vanishes there); the random scale
changes which discrepancies the generator sees first, not where it ends. The default range [2, 8] is this
implementation's choice (the paper's interval could not be checked offline); configs set their own.

NASA (Negative-Away Steer Attention): a training-free negative condition for one-step students. In every
cross-attention layer the attention output of the negative prompt is subtracted from the positive one before the
output projection,
    Z = Attn(Q, K+, V+) - lambda Attn(Q, K-, V-),       out = to_out(Z)      (the paper's Z_NASA = Z+ - lambda Z-),
so undesired attributes are steered away inside the network rather than by output-space CFG (which blends the two
one-step outputs). ``negative_away_steering(network, negative_cond, scale)`` does this for diffusers
UNet2DConditionModel students through an attention processor on the cross-attention layers only.
The analogue for class-embedding networks (our MNIST UNet2DModel adds a class embedding e(y) to the time embedding,
ToyMLPDenoiser adds e(y) to its first hidden layer): there the condition enters additively through e(y) instead of
through K/V, so its "contribution" is e(y) itself and NASA becomes
    e = e(y) - lambda e(y_neg),
applied with a forward hook on the class-embedding layer. Unlike the attention version the subtracted term does not
depend on the image features (there is no query). lambda = 0 leaves either network exactly unchanged.
``SNOOPI.sample(noise, cond, negative_cond=..., negative_scale=...)`` samples the student with NASA.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vsd import VSD


class SNOOPI(VSD):
    def __init__(self, *args, guidance_scale_range: Sequence[float] = (2.0, 8.0), **kwargs):
        super().__init__(*args, **kwargs)
        if len(guidance_scale_range) != 2 or not 0.0 <= guidance_scale_range[0] <= guidance_scale_range[1]:
            raise ValueError(f"guidance_scale_range must be [low, high] with 0 <= low <= high, "
                             f"got {list(guidance_scale_range)}")
        if self.hparams.guidance_scale != 1.0:
            raise ValueError(f"SNOOPI draws its guidance scale from guidance_scale_range each step; leave "
                             f"guidance_scale at 1.0, got {self.hparams.guidance_scale}")
        if not self.guide_critic:
            raise ValueError("SNOOPI (PG-SB) guides the teacher and the critic with the same scale; "
                             "guide_critic must be true")
        if not (getattr(self.teacher, "num_classes", 0) or self.teacher.text_conditioned):
            raise ValueError("SNOOPI needs a conditional teacher (class labels with num_classes > 0, or prompts): its "
                             "guidance needs an unconditional branch")
        self.guidance_scale_range = (float(guidance_scale_range[0]), float(guidance_scale_range[1]))

    def sample_guidance_scale(self) -> float:
        """w ~ U[w_min, w_max], one draw per generator step from the global generator (restored on resume)."""
        low, high = self.guidance_scale_range
        return low + (high - low) * float(torch.rand((), dtype=torch.float64))

    def step_guidance_scale(self) -> float:
        return self.sample_guidance_scale()

    def generator_loss(self, batch):
        if batch.get("cond") is None:
            raise ValueError("SNOOPI guides with conditions: use a conditional datamodule (conditional: true, or a "
                             "PromptDataModule), got a batch without 'cond'")
        return super().generator_loss(batch)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Tensor | None = None, nfe: int | None = None,
               generator: torch.Generator | None = None, negative_cond: Tensor | None = None,
               negative_scale: float = 0.0, **hybrid) -> Tensor:
        """Student samples (EMA network when tracked) with NASA against ``negative_cond`` at ``negative_scale``;
        ``hybrid``: the base class's teacher_steps / teacher_method."""
        network = self.evaluation_student if self.evaluation_student is not None else self.student
        with negative_away_steering(network, negative_cond, negative_scale):
            return super().sample(noise, cond, nfe, generator, **hybrid)


# ---------------------------------------------------------------------- NASA
class NegativeAwaySteerProcessor:
    """Cross-attention processor computing to_out(Attn(Q, K+, V+) - scale Attn(Q, K-, V-)).

    The positive branch follows the same operations as diffusers' default scaled-dot-product processor, so with
    scale = 0 the layer's output is bit-for-bit the default one. ``negative_states``: (B, L-, C) encoder states."""

    def __init__(self, negative_states: Tensor, scale: float):
        self.negative_states, self.scale = negative_states, scale

    @staticmethod
    def _attention(attn, query: Tensor, context: Tensor, batch_size: int, mask: Tensor | None) -> Tensor:
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is None:
            raise ValueError("NegativeAwaySteerProcessor is for cross-attention layers (encoder states required)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_like = hidden_states.ndim == 4
        if image_like:
            batch_size, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channels, height * width).transpose(1, 2)
        batch_size = encoder_hidden_states.shape[0]
        if self.negative_states.shape[0] != batch_size:
            raise ValueError(f"negative condition batch {self.negative_states.shape[0]} != batch {batch_size}")
        mask = None
        if attention_mask is not None:  # the mask belongs to the positive prompt's tokens only
            mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        positive = self._attention(attn, query, encoder_hidden_states, batch_size, mask)
        negative = self._attention(attn, query, self.negative_states.to(encoder_hidden_states), batch_size, None)
        hidden_states = positive - self.scale * negative                      # NASA: steer away from the negative
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))          # output projection, dropout
        if image_like:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The diffusers ``Attention`` modules that attend to encoder states (``attn2`` of the transformer blocks)."""
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def _class_embedding(network: nn.Module) -> nn.Embedding | None:
    unet = getattr(network, "unet", None)
    for owner in (unet, network):
        embedding = getattr(owner, "class_embedding", None) if owner is not None else None
        if isinstance(embedding, nn.Embedding):
            return embedding
    return None


@contextlib.contextmanager
def negative_away_steering(network: nn.Module, negative_cond: Tensor | None, scale: float):
    """Within the block, ``network`` applies NASA against ``negative_cond`` with strength ``scale``:
    * a diffusers UNet2DConditionModel (``network.unet`` or the UNet itself): ``negative_cond`` is the negative encoder
      hidden states (B, L-, C); every cross-attention layer uses ``NegativeAwaySteerProcessor``;
    * a network with a class embedding (UNet2DModel with ``num_class_embeds``, ToyMLPDenoiser): ``negative_cond`` is
      (B,) negative labels and the embedding's output becomes e(y) - scale e(y_neg).
    ``negative_cond=None`` leaves the network untouched. The original processors / no hook are restored on exit."""
    if negative_cond is None:
        yield
        return
    if scale < 0:
        raise ValueError(f"negative_scale must be >= 0, got {scale}")
    unet = getattr(network, "unet", network)
    layers = cross_attention_layers(unet) if hasattr(unet, "attn_processors") else []
    if layers:
        originals = [(attn, attn.processor) for _, attn in layers]
        processor = NegativeAwaySteerProcessor(negative_cond, float(scale))
        try:
            for attn, _ in originals:
                attn.set_processor(processor)
            yield
        finally:
            for attn, original in originals:
                attn.set_processor(original)
        return
    embedding = _class_embedding(network)
    if embedding is None:
        raise ValueError(f"{type(network).__name__} has neither cross-attention layers nor a class embedding; "
                         "NASA has nothing to steer")
    negative = negative_cond.long()

    def subtract_negative_class(module, _inputs, output):
        # F.embedding, not module(...): calling the module would re-enter this hook
        return output - scale * F.embedding(negative.to(output.device), module.weight).to(output.dtype)

    handle = embedding.register_forward_hook(subtract_negative_class)
    try:
        yield
    finally:
        handle.remove()
