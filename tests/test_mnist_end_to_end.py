"""A small end-to-end `distill fit` on MNIST: DMD2 from the shipped teacher improves the one-step student's FID
(fast classifier extractor) by a large factor within a couple of hundred optimizer steps."""
import os

import pytest
import torch

from lightning_modules.evaluation.image_report import fixed_inputs
from lightning_modules.evaluation.image_metrics import image_metrics
from tests.toy_runs import QUIET
from lightning_modules.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "mnist-teacher", "unet")


def one_step_fid(module, datamodule, n=300):
    reference = datamodule.split("test")[0][:n]
    noise, labels = fixed_inputs(n, reference.shape[1:], 10, seed=7)
    samples = module.sample(noise, labels, nfe=1)
    return image_metrics(samples, "mnist-test-28x28-e2e", reference, kid=False, prc=False)["fid"]


@pytest.mark.skipif(not os.path.isdir(TEACHER), reason="the shipped MNIST teacher is missing (make teacher)")
def test_dmd2_fit_on_mnist_improves_one_step_fid(tmp_path):
    cli = main(["-c", "experiments/mnist/dmd2.yaml", *QUIET, "--trainer.max_steps=160",
                "--trainer.callbacks=[]", "--trainer.default_root_dir", str(tmp_path)], run=False)
    module, datamodule = cli.model, cli.datamodule
    before = one_step_fid(module, datamodule)  # the student starts as the teacher: one step gives blurred means
    cli.trainer.fit(module, datamodule)
    after = one_step_fid(module, datamodule)
    print(f"one-step FID (classifier features): {before:.2f} -> {after:.2f}")
    assert after * 3 < before
    assert torch.isfinite(torch.tensor(after))
