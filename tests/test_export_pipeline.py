"""Text-to-image pipeline export: a tiny latent student (UNet2DConditionModel on MiniLM embeddings, tiny AutoencoderKL)
becomes a diffusers StableDiffusionPipeline folder that plain ``DiffusionPipeline.from_pretrained`` runs in a python
that cannot import the project, and whose prompt embeddings, latents and images equal the framework's own."""
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch import nn

from lightning_modules import DMD2
from lightning_modules.conditioning.text_encoders import MiniLMTextEncoder
from lightning_modules.diffusion import VPDiscreteSchedule
from lightning_modules.export_pipeline import export_text_to_image_pipeline, merged_unet
from lightning_modules.networks import DiffusersUNetDenoiser
from lightning_modules.networks.lora import LoRACritic

UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384, attention_head_dim=2)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
           norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           sample_size=16, scaling_factor=0.18215)
PROMPTS = ["a red cube on a table", "an astronaut riding a horse, highly detailed, trending on artstation"]


class SDLatents(nn.Module):
    """The frozen SD-style autoencoder of a latent teacher: latents = scaling_factor * mean of the VAE posterior."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(vae.config.scaling_factor)

    def encode(self, images):
        return self.vae.encode(images).latent_dist.mean * self.scaling_factor

    def decode(self, latents):
        return self.vae.decode(latents / self.scaling_factor).sample


def _perturb(parameters, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _module(lora: bool, prediction_type: str, timesteps):
    import diffusers

    torch.manual_seed(0)
    teacher = DiffusersUNetDenoiser(config=UNET, unet_class="UNet2DConditionModel", prediction_type=prediction_type,
                                    schedule=VPDiscreteSchedule())
    autoencoder = SDLatents(diffusers.AutoencoderKL(**VAE))
    student = LoRACritic(teacher, rank=2) if lora else None
    module = DMD2(teacher, student=student, autoencoder=autoencoder, student_timesteps=timesteps, guidance_scale=3.0)
    if lora:  # non-zero adapters: the student differs from its frozen base (the shared teacher)
        _perturb([layer.lora_B["critic"].weight for _, layer in module.student.adapter_layers()], 1, scale=0.3)
    else:
        _perturb(module.student.parameters(), 1)
    return module.eval()


@pytest.fixture(scope="module")
def encoder():
    return MiniLMTextEncoder()  # the embedded default (max_length 16); ~7 s to load, once for this file


# The loader runs in a python that cannot see the project: -I (no PYTHONPATH, no user site, no cwd) and -S (no .pth
# files, so the editable install's finder is not installed); only the environment's site-packages is put on sys.path.
LOADER = r"""
import sys
sys.path.append(sys.argv[1])
try:
    import lightning_modules
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("lightning_modules is importable in the loader")
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline

inputs = torch.load(sys.argv[2])
results = {}
for name, case in inputs.items():
    pipe = DiffusionPipeline.from_pretrained(case["folder"], local_files_only=True)
    embeds = pipe.encode_prompt(case["prompts"], "cpu", 1, False)[0]
    run = lambda kind: pipe(case["prompts"], num_inference_steps=case["steps"], guidance_scale=1.0,
                            latents=case["latents"].clone(), generator=torch.Generator().manual_seed(7),
                            output_type=kind).images
    results[name] = {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                     "embeds": embeds, "latents": run("latent"), "images": run("pt")}
assert not any(m.split(".")[0] == "lightning_modules" for m in sys.modules)
torch.save(results, sys.argv[3])
"""


def test_pipeline_runs_in_plain_diffusers_and_reproduces_the_student(tmp_path, encoder):
    modules = {"one_step": _module(lora=False, prediction_type="epsilon", timesteps=[999]),
               "lora_two_step": _module(lora=True, prediction_type="v_prediction", timesteps=[999, 499])}
    z = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    embeds = encoder.encode(PROMPTS).embeds
    inputs, expected = {}, {}
    for name, module in modules.items():
        folder = export_text_to_image_pipeline(module, str(tmp_path / name), text_encoder=encoder)
        info = json.load(open(os.path.join(folder, "distillation.json")))
        assert info["method"] == "DMD2" and info["num_steps"] == len(module.student_times)
        assert info["pipeline_needs_timesteps_argument"] is False and info["guidance_scale"] == 3.0
        assert info["text_encoder"] == {"class": "BertModel", "source": encoder.identity, "max_length": 16,
                                        "use_attention_mask": True}
        index = json.load(open(os.path.join(folder, "model_index.json")))
        assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
        assert index["text_encoder"] == ["transformers", "BertModel"] and index["safety_checker"] == [None, None]
        assert json.load(open(os.path.join(folder, "tokenizer", "tokenizer_config.json")))["model_max_length"] == 16
        readme = open(os.path.join(folder, "README.md")).read()
        assert f"num_inference_steps={len(module.student_times)}, guidance_scale=1.0" in readme
        x0 = module.sample(z, embeds, generator=torch.Generator().manual_seed(7))
        expected[name] = {"latents": x0, "images": (module.to_images(x0) / 2 + 0.5).clamp(0, 1)}
        inputs[name] = {"folder": folder, "prompts": PROMPTS, "steps": len(module.student_times),
                        "latents": info["pipeline_latents_scale"] * z}
    # the one-step Euler scheduler takes unit noise as is; LCM's latents carry the prior's sigma(999) < 1
    assert inputs["one_step"]["latents"].equal(z)
    abar = VPDiscreteSchedule()._alphas_cumprod[999]
    assert torch.allclose(inputs["lora_two_step"]["latents"], (1 - abar).sqrt().float() * z)
    # the LoRA student is not its base: merging changed the weights
    with torch.no_grad():
        t = torch.full((2,), 999.0, dtype=torch.float64)
        teacher_x0 = modules["lora_two_step"].teacher(0.99 * z, t, embeds)
        assert (modules["lora_two_step"].student(0.99 * z, t, embeds) - teacher_x0).abs().max() > 1e-2

    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", LOADER, site, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")

    assert results["one_step"]["scheduler"] == "EulerDiscreteScheduler"
    assert results["lora_two_step"]["scheduler"] == "LCMScheduler"
    for name in modules:
        got = results[name]
        assert got["pipeline"] == "StableDiffusionPipeline"
        assert got["embeds"].equal(embeds), name  # SD's encode_prompt gives exactly our MiniLM embeddings
        assert got["latents"].shape == (2, 4, 8, 8) and got["images"].shape == (2, 3, 16, 16)
        # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) magnifies float32 rounding by 1 / sqrt(abar_999) = 14.6: the
        # untrained student's latents reach |x0| ~ 50, so they agree to float32 precision relative to that scale
        scale = expected[name]["latents"].abs().max()
        assert (got["latents"] - expected[name]["latents"]).abs().max() <= 2e-6 * scale, name
        torch.testing.assert_close(got["images"], expected[name]["images"], rtol=0, atol=1e-5)
        assert got["latents"].std() > 0.1  # a real sample, not a constant


def test_refuses_a_non_empty_folder_and_leaves_it_as_it_was(tmp_path, encoder):
    module = _module(lora=False, prediction_type="epsilon", timesteps=[999])
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite=True"):
        export_text_to_image_pipeline(module, str(target), text_encoder=encoder)
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no staging folder left behind
    with pytest.raises(ValueError, match="nfe must be >= 1, got 0"):
        export_text_to_image_pipeline(module, str(tmp_path / "new"), text_encoder=encoder, nfe=0)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_peft_lora_injected_unet_is_merged_into_a_plain_copy():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    student = DiffusersUNetDenoiser(config=UNET, unet_class="UNet2DConditionModel", schedule=VPDiscreteSchedule())
    student.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"],
                                        init_lora_weights=False))
    merged, described = merged_unet(student)
    assert described is student and merged is not student.unet
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert any(isinstance(m, BaseTunerLayer) for m in student.unet.modules())  # the original keeps its adapters
    g = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 384, generator=g)
    t = torch.tensor([999.0, 300.0])
    with torch.no_grad():
        adapted = student.unet(x, t, encoder_hidden_states=ehs).sample
        torch.testing.assert_close(merged(x, t, encoder_hidden_states=ehs).sample, adapted, rtol=0, atol=1e-5)
        student.unet.disable_adapters()
        assert (student.unet(x, t, encoder_hidden_states=ehs).sample - adapted).abs().max() > 1e-3


def test_cli_pipeline_options_need_the_pipeline_flag(capsys):
    from lightning_modules.cli import main

    with pytest.raises(SystemExit):
        main(["export", "-c", "unused.yaml", "--ckpt_path", "unused.ckpt", "--export_dir", "out", "--vae", "vae"])
    assert "--text_encoder, --vae and --nfe apply to --pipeline true only" in capsys.readouterr().err
