"""Text encoders of real latent teachers, loaded from tiny local pipeline folders: each one's embeddings (prompts and
the CFG null branch) equal what the diffusers pipeline's own ``encode_prompt`` returns on the same components."""
from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch

from lightning_modules.conditioning.pipeline_encoders import (CLIPTextEncoder, FluxTextEncoder, SD3TextEncoder,
                                                              SDXLTextEncoder, T5TextEncoder,
                                                              text_encoder_from_pipeline)
from tests.tiny_text import add_tiny_text_encoders

PROMPTS = ["a photo of a cat", "A Red Dog on the grass, digit 7!"]
T5_LENGTH = 24  # max_sequence_length of the T5-based pipelines in these tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kind: (folder, diffusers pipeline object built on the very same text components, other parts None)}."""
    import diffusers

    classes = {"sd15": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
               "sd3": diffusers.StableDiffusion3Pipeline, "pixart": diffusers.PixArtSigmaPipeline,
               "flux": diffusers.FluxPipeline}
    root, out = tmp_path_factory.mktemp("text"), {}
    for kind, cls in classes.items():
        folder = str(root / kind)
        parts = add_tiny_text_encoders(folder, kind)
        params = inspect.signature(cls.__init__).parameters
        kwargs = {n: parts.get(n) for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
        if kind == "sd15":
            kwargs["requires_safety_checker"] = False
        out[kind] = folder, cls(**kwargs)
    return out


def close(a, b):
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6, rtol=1e-5)


def test_sd15_clip_matches_pipeline_with_clip_skip_and_null(tiny):
    folder, pipe = tiny["sd15"]
    encoder = text_encoder_from_pipeline(folder)
    assert isinstance(encoder, CLIPTextEncoder) and encoder.max_length == 77 and not encoder.use_mask
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    cond = encoder.condition(PROMPTS)
    assert cond.embeds.shape == (2, 77, 16) and close(cond.embeds, positive) and close(cond.null_embeds, negative)
    assert cond.mask is None and cond.pooled.shape == (2, 16)
    # diffusers 0.42's clip_skip path reads text_encoder.text_model, gone in transformers 5: its formula by hand
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        skipped = pipe.text_encoder.final_layer_norm(pipe.text_encoder(ids, output_hidden_states=True)[-1][-2])
    skip_encoder = CLIPTextEncoder(folder, clip_skip=1)
    assert close(skip_encoder.encode(PROMPTS).embeds, skipped)
    assert not torch.allclose(skipped, positive, atol=1e-3)  # clip_skip selects another layer
    assert skip_encoder.identity != encoder.identity and "StableDiffusionPipeline" in encoder.identity
    with pytest.raises(ValueError, match="clip_skip must be in \\[0, 2\\].*got 3"):
        CLIPTextEncoder(folder, clip_skip=3)


def test_sdxl_matches_pipeline_and_zeros_the_empty_prompt(tiny):
    folder, pipe = tiny["sdxl"]
    encoder = text_encoder_from_pipeline(folder)
    assert isinstance(encoder, SDXLTextEncoder) and encoder.force_zeros_for_empty_prompt
    embeds, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    cond = encoder.condition(PROMPTS)
    assert cond.embeds.shape == (2, 77, 16) and cond.pooled.shape == (2, 8)
    assert close(cond.embeds, embeds) and close(cond.pooled, pooled)
    assert close(cond.null_embeds, null) and close(cond.null_pooled, null_pooled)
    assert cond.null_embeds.abs().max() == 0 and cond.null_pooled.abs().max() == 0
    # an explicit negative prompt is encoded, also by the pipeline
    embeds, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=["blurry", "ugly"])
    cond = encoder.condition(PROMPTS, ["blurry", "ugly"])
    assert close(cond.null_embeds, null) and close(cond.null_pooled, null_pooled) and null.abs().max() > 0
    # without force_zeros the null is the empty prompt's embedding, as the pipeline's
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, null, _, null_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    plain = SDXLTextEncoder(folder, force_zeros_for_empty_prompt=False)
    cond = plain.condition(PROMPTS)
    assert close(cond.null_embeds, null) and close(cond.null_pooled, null_pooled) and null.abs().max() > 0
    assert plain.identity != encoder.identity


def test_sd3_matches_pipeline(tiny):
    folder, pipe = tiny["sd3"]
    encoder = text_encoder_from_pipeline(folder, max_length=T5_LENGTH)
    assert isinstance(encoder, SD3TextEncoder)
    embeds, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                           max_sequence_length=T5_LENGTH)
    cond = encoder.condition(PROMPTS)
    assert cond.embeds.shape == (2, 77 + T5_LENGTH, 16) and cond.pooled.shape == (2, 8)
    assert close(cond.embeds, embeds) and close(cond.pooled, pooled)
    assert close(cond.null_embeds, null) and close(cond.null_pooled, null_pooled)
    assert cond.embeds[:, :77, 12:].abs().max() == 0  # the 6 + 6 CLIP channels are zero-padded to T5's 16
    assert cond.embeds[:, 77:].abs().max() > 0


def test_pixart_t5_matches_pipeline_with_mask(tiny):
    folder, pipe = tiny["pixart"]
    encoder = text_encoder_from_pipeline(folder, max_length=T5_LENGTH)
    assert isinstance(encoder, T5TextEncoder) and encoder.use_mask
    embeds, mask, null, null_mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=T5_LENGTH)
    cond = encoder.condition(PROMPTS)
    assert cond.embeds.shape == (2, T5_LENGTH, 16) and cond.pooled is None
    assert close(cond.embeds, embeds) and torch.equal(cond.mask.cpu(), mask.cpu())
    assert close(cond.null_embeds, null) and torch.equal(cond.null_mask.cpu(), null_mask.cpu())
    assert cond.mask.sum(1)[0] < cond.mask.sum(1)[1] < T5_LENGTH and cond.null_mask.sum(1).tolist() == [1, 1]
    assert text_encoder_from_pipeline(folder).max_length == 300  # PixArt-Sigma's default max_sequence_length


def test_flux_matches_pipeline(tiny):
    folder, pipe = tiny["flux"]
    encoder = text_encoder_from_pipeline(folder, max_length=T5_LENGTH)
    assert isinstance(encoder, FluxTextEncoder) and not encoder.use_mask
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=T5_LENGTH)
    out = encoder.encode(PROMPTS)
    assert out.embeds.shape == (2, T5_LENGTH, 16) and out.pooled.shape == (2, 8)
    assert close(out.embeds, embeds) and close(out.pooled, pooled)


def test_long_prompts_are_truncated_counted_and_match(tiny, caplog):
    folder, pipe = tiny["sd15"]
    encoder = CLIPTextEncoder(folder)
    prompts = ["a cat " * 50, "a dog", "the " * 76]  # 102, 4 and 78 tokens with start / end
    with caplog.at_level(logging.WARNING, logger="lightning_modules.conditioning.text_encoders"):
        out = encoder.encode(prompts)
    assert encoder.last_truncated == 2
    assert "2 of 3 prompt(s) are longer than CLIPTextEncoder's limit of 77 tokens" in caplog.text
    positive, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    assert close(out.embeds, positive)
    t5_folder, _ = tiny["pixart"]
    t5 = T5TextEncoder(t5_folder, max_length=8)
    assert t5.encode(["a cat", "one two three four five six seven eight"]).embeds.shape == (2, 8, 16)
    assert t5.last_truncated == 1


def test_bad_folders_and_classes_are_named(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_encoder_from_pipeline(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        text_encoder_from_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="'KandinskyPipeline'.*supported: .*StableDiffusionXLPipeline"):
        text_encoder_from_pipeline(str(tmp_path))
    folder, _ = tiny["sd15"]
    with pytest.raises(FileNotFoundError, match="text_encoder_9"):
        CLIPTextEncoder(folder, subfolder_encoder="text_encoder_9")
    with pytest.raises(ValueError, match="max_length 80 exceeds .*max_position_embeddings 77"):
        CLIPTextEncoder(folder, max_length=80)
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        SDXLTextEncoder(folder)
    short = CLIPTextEncoder(folder, max_length=16)
    assert "max_length=16" in short.identity and short.identity != CLIPTextEncoder(folder).identity
