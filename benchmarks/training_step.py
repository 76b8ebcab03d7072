"""What the memory benchmarks (benchmarks/t2i.py, benchmarks/lora_memory.py) measure of one training iteration, in
one place: exact state bytes of what trains, the peak bytes autograd saves for backward in one loss, the median
seconds of an iteration (a critic update, if the method has a critic, then a generator update, clipped at 10 like the
trainer), and the subprocess that runs one benchmark row (one CPU thread, so each row's peak RSS is its own)."""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(module, optimizers) -> dict:
    """Parameters + gradients + optimizer state of the trained parameters (the frozen ones are not counted)."""
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer_state = sum(tensor_bytes(v for v in state.values() if hasattr(v, "element_size"))
                          for optimizer in optimizers for state in optimizer.state.values())
    return {"parameters": tensor_bytes(trained), "gradients": tensor_bytes(p.grad for p in trained),
            "optimizer_state": optimizer_state}


def peak_saved_activations(loss_fn, batch) -> int:
    """Peak bytes held by autograd's saved tensors while ``loss_fn(batch)`` builds its graph (then backward)."""
    import torch

    live, peak = [0], [0]

    def pack(tensor):
        live[0] += tensor.numel() * tensor.element_size()
        peak[0] = max(peak[0], live[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(batch)["loss"]
    loss.backward()
    return peak[0]


def measure_training_iterations(module, next_batch, generator_optimizer, critic_optimizer=None, iterations: int = 4,
                                warmup: int = 2, synchronize=lambda: None) -> dict:
    """Time ``iterations`` iterations after ``warmup`` more on batches from ``next_batch()``, then count the saved
    activations of each loss on one more batch and the state bytes."""
    import torch

    def update(optimizer, loss_fn, parameters, batch):
        optimizer.zero_grad(set_to_none=False)
        loss_fn(batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimizer.step()

    generator_parameters = list(module.generator_parameters())
    critic_parameters = list(module.critic_parameters()) if critic_optimizer is not None else []
    times = []
    for i in range(iterations + warmup):
        batch = next_batch()
        synchronize()
        start = time.perf_counter()
        if critic_optimizer is not None:
            update(critic_optimizer, module.critic_loss, critic_parameters, batch)
        update(generator_optimizer, module.generator_loss, generator_parameters, batch)
        module.on_generator_step_end()
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    batch = next_batch()
    activations = {"generator": peak_saved_activations(module.generator_loss, batch)}
    if critic_optimizer is not None:
        activations["critic"] = peak_saved_activations(module.critic_loss, batch)
    state = state_bytes(module, [o for o in (generator_optimizer, critic_optimizer) if o is not None])
    return {"seconds_per_iteration": statistics.median(times),
            "trainable_parameters": sum(p.numel() for p in set(generator_parameters) | set(critic_parameters)),
            "state_bytes": state, "state_bytes_total": sum(state.values()),
            "activation_bytes": activations, "activation_bytes_peak": max(activations.values()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_row(script: str, arguments: list[str], name: str, cwd: str) -> dict:
    """Run ``script --worker arguments`` in its own process (one thread) and return the dict its RESULT line holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.abspath(script), "--worker", *arguments], capture_output=True,
                          text=True, env=env, cwd=cwd)
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if done.returncode != 0 or result is None:
        raise RuntimeError(f"benchmark row {name!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result[len("RESULT "):])
