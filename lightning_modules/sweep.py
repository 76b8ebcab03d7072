"""``distill sweep``: a sweep file -> one Slurm job array (one ``distill fit`` per point) -> a summary table.

    distill sweep experiments/slurm/sweeps/ring8_lr_seed.yaml [--out DIR] [--dry-run] [--wait] [--cluster local]
    distill sweep --summarize DIR

A sweep file names base configs, fixed overrides, and points as a grid (cartesian product) and/or a list, over any
config key the ``distill fit`` command line takes (``config`` picks the config file, so method x lr x seed is one grid):

    name: ring8-lr-seed
    configs: [experiments/toy/ring8/dmd2.yaml]            # applied to every point (before a point's own ``config``)
    overrides: {trainer.max_epochs: 1}                     # every point
    grid:
      config: [experiments/toy/ring8/dmd2.yaml, experiments/toy/ring8/sid.yaml]
      model.init_args.generator_optimizer.init_args.lr: [1.0e-4, 3.0e-4]
      seed_everything: [0, 1]
    points: []                                             # optional explicit points, each a {key: value} mapping
    slurm: {nodes: 1, tasks_per_node: 1, gpus_per_node: 1, cpus_per_task: 8, timeout_min: 240,
            partition: gpu, array_parallelism: 16, signal_delay_s: 120, setup: ["module load cuda"]}

Each point gets its own run directory ``DIR/runs/<point>`` (``trainer.default_root_dir``: its ``hpc_ckpt_*``
preemption checkpoints live there, so a requeued point resumes by itself) and TensorBoard run
``DIR/tensorboard/<sweep name>/<point>`` (``tensorboard --logdir DIR/tensorboard``). Every point runs with
``callbacks.preemption.PreemptionCheckpoint``; the array is submitted with ``--signal=USR1@signal_delay_s`` so a
point near its time limit checkpoints and requeues itself.

Submission uses submitit (``map_array``: one sbatch job array; each task runs ``srun python -m submitit...``, which
calls ``run_point`` in-process, so Lightning's SLURMEnvironment sees the task's ranks, nodes and address). A second
job that depends on the array (``afterany``) writes ``DIR/summary.{md,csv,json}``: one row per point with its
parameters, status, steps, restarts, seconds and final metrics. ``--wait`` also waits and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Any

import yaml

__all__ = ["expand_sweep", "load_sweep", "main", "run_point", "submit_sweep", "summarize"]

_SLURM_GENERIC = {"nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "timeout_min", "mem_gb", "name"}
_RESERVED = {"name", "out", "configs", "overrides", "grid", "points", "slurm", "metrics"}


# ---------------------------------------------------------------------------------------------------- sweep files
def load_sweep(path: str) -> dict:
    with open(path) as handle:
        sweep = yaml.safe_load(handle) or {}
    if not isinstance(sweep, dict):
        raise ValueError(f"{path}: a sweep file is a mapping, got {type(sweep).__name__}")
    unknown = set(sweep) - _RESERVED
    if unknown:
        raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)} (known: {sorted(_RESERVED)})")
    sweep.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    sweep["_file"] = os.path.abspath(path)
    return sweep


def _label(key: str, value: Any) -> str:
    short = "config" if key == "config" else key.split(".")[-1]
    short = {"seed_everything": "seed", "config": ""}.get(short, short)
    if key == "config":
        text = os.path.splitext(os.path.basename(str(value)))[0]
    elif isinstance(value, float):
        text = f"{value:.3g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{short}{text}").strip("_")


def expand_sweep(sweep: dict, base_dir: str | None = None) -> list[dict]:
    """The sweep's points: [{"name", "index", "params", "configs", "overrides"}]. ``params`` holds the swept values
    (grid keys and list-point keys); ``overrides`` are all command-line overrides of the point."""
    base_dir = base_dir or os.getcwd()
    grid = sweep.get("grid") or {}
    if not isinstance(grid, dict):
        raise ValueError("grid must map config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list, got {values!r}")
    listed = sweep.get("points") or []
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise ValueError("points must be a list of {key: value} mappings")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    if listed:
        combos = [{**c, **p} for c in (combos or [{}]) for p in listed]
    if not combos:
        combos = [{}]
    varying = [k for k in dict.fromkeys(k for c in combos for k in c)
               if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in combos}) > 1]

    def resolve(path: str) -> str:
        return path if os.path.isabs(path) else os.path.abspath(os.path.join(base_dir, path))

    points, names = [], set()
    for index, params in enumerate(combos):
        configs = [resolve(c) for c in (sweep.get("configs") or [])]
        if "config" in params:
            extra = params["config"]
            configs += [resolve(c) for c in (extra if isinstance(extra, list) else [extra])]
        if not configs:
            raise ValueError("a sweep needs configs: or a config key in its grid/points")
        overrides = {**(sweep.get("overrides") or {}), **{k: v for k, v in params.items() if k != "config"}}
        label = "-".join(_label(k, params[k]) for k in varying if k in params) or "run"
        name = f"{index:03d}-{label}"[:120]
        if name in names:
            raise ValueError(f"two points are both named {name}")
        names.add(name)
        points.append({"name": name, "index": index, "params": params, "configs": configs, "overrides": overrides})
    return points


def _override_arg(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f"--{key}={value}"
    return f"--{key}={json.dumps(value)}"


def fit_arguments(point: dict, sweep_name: str, sweep_dir: str) -> list[str]:
    """The ``distill fit`` arguments of one point (its run directory, TensorBoard run and preemption callback)."""
    run_dir = os.path.join(sweep_dir, "runs", point["name"])
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": os.path.join(sweep_dir, "tensorboard"), "name": sweep_name,
                            "version": point["name"]}}
    args = ["fit"]
    for config in point["configs"]:
        args += ["-c", config]
    args += [_override_arg(k, v) for k, v in point["overrides"].items()]
    args += [f"--trainer.default_root_dir={run_dir}", f"--trainer.logger={json.dumps(logger)}",
             '--trainer.callbacks+={"class_path": "callbacks.preemption.PreemptionCheckpoint"}']
    return args


# ---------------------------------------------------------------------------------------------------- one point
def _number(value) -> float | None:
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None


def run_point(point: dict, sweep_name: str, sweep_dir: str) -> dict:
    """Run one sweep point in this process (the Slurm task), then write ``runs/<point>/result.json`` on rank 0."""
    from lightning_modules.lightning_cli import build_cli
    from callbacks.preemption import PreemptionCheckpoint

    run_dir = os.path.join(sweep_dir, "runs", point["name"])
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    cli = build_cli(fit_arguments(point, sweep_name, sweep_dir), run=True)
    trainer = cli.trainer
    preemption = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    preempted = preemption.preempted if preemption is not None else None
    result = {
        "name": point["name"], "params": point["params"],
        "status": "preempted" if preempted else ("completed" if trainer.state.status.value == "finished"
                                                 else trainer.state.status.value),
        "preempted": preempted,
        "global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
        "seconds": round(time.time() - start, 2),
        "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "world_size": int(trainer.world_size), "nodes": int(trainer.num_nodes),
        "metrics": {k: n for k, v in sorted(trainer.callback_metrics.items()) if (n := _number(v)) is not None},
    }
    if trainer.is_global_zero:
        history = os.path.join(run_dir, "attempts.jsonl")
        with open(history, "a") as handle:
            handle.write(json.dumps(result) + "\n")
        if not preempted:
            _write_json(os.path.join(run_dir, "result.json"), result)
    return result


def _write_json(path: str, data) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------- summary
def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summarize(sweep_dir: str, metrics: list[str] | None = None, quiet: bool = False) -> list[dict]:
    """Collect every point's result into ``summary.md`` / ``summary.csv`` / ``summary.json`` in ``sweep_dir``."""
    with open(os.path.join(sweep_dir, "sweep.json")) as handle:
        manifest = json.load(handle)
    rows = []
    for point in manifest["points"]:
        run_dir = os.path.join(sweep_dir, "runs", point["name"])
        result_path = os.path.join(run_dir, "result.json")
        result = None
        if os.path.exists(result_path):
            with open(result_path) as handle:
                result = json.load(handle)
        attempts = 0
        history = os.path.join(run_dir, "attempts.jsonl")
        if os.path.exists(history):
            with open(history) as handle:
                attempts = sum(1 for line in handle if line.strip())
        rows.append({"point": point["name"], "params": point["params"],
                     "status": result["status"] if result else ("incomplete" if attempts else "missing"),
                     "global_step": result["global_step"] if result else None,
                     "restarts": result["restarts"] if result else None,
                     "seconds": result["seconds"] if result else None,
                     "metrics": result["metrics"] if result else {}})
    if metrics is None:
        metrics = manifest.get("metrics")
    if not metrics:
        found = sorted({k for row in rows for k in row["metrics"]})
        metrics = [k for k in found if k.startswith("val/")] or [k for k in found if k.endswith("/loss")]
    param_keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    header = ["point", *param_keys, "status", "global_step", "restarts", "seconds", *metrics]
    table = [[row["point"], *[_format(row["params"].get(k)) for k in param_keys], row["status"],
              _format(row["global_step"]), _format(row["restarts"]), _format(row["seconds"]),
              *[_format(row["metrics"].get(m)) for m in metrics]] for row in rows]
    markdown = io.StringIO()
    markdown.write(f"# Sweep {manifest['name']}\n\n{len(rows)} points, "
                   f"{sum(r['status'] == 'completed' for r in rows)} completed.\n\n")
    markdown.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for line in table:
        markdown.write("| " + " | ".join(line) + " |\n")
    with open(os.path.join(sweep_dir, "summary.md"), "w") as handle:
        handle.write(markdown.getvalue())
    with open(os.path.join(sweep_dir, "summary.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)
    _write_json(os.path.join(sweep_dir, "summary.json"), {"name": manifest["name"], "metrics": metrics, "rows": rows})
    if not quiet:
        print(markdown.getvalue())
    return rows


# ---------------------------------------------------------------------------------------------------- submission
def _executor(folder: str, cluster: str | None, slurm: dict, name: str):
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    generic = {k: v for k, v in slurm.items() if k in _SLURM_GENERIC}
    specific = {k: v for k, v in slurm.items() if k not in _SLURM_GENERIC}
    generic.setdefault("name", name)
    generic.setdefault("timeout_min", 60)
    generic.setdefault("nodes", 1)
    generic.setdefault("tasks_per_node", 1)
    params = dict(generic)
    if executor.cluster == "slurm":
        specific.setdefault("signal_delay_s", 120)
        setup = list(specific.pop("setup", []) or [])
        # Lightning's auto-requeue convention: SIGUSR1 before the time limit; submitit's fallback handler (used only
        # outside the training loop) listens for the same signal.
        setup.insert(0, "export SUBMITIT_PREEMPT_SIGNAL=USR1")
        additional = dict(specific.pop("additional_parameters", {}) or {})
        additional.setdefault("signal", f"USR1@{specific.pop('signal_delay_s')}")
        params.update({f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in specific.items()})
        params["slurm_setup"] = setup
        params["slurm_additional_parameters"] = additional
    executor.update_parameters(**params)
    return executor


def submit_sweep(sweep_file: str, out: str | None = None, cluster: str | None = None, dry_run: bool = False,
                 wait: bool = False, poll_s: float = 5.0, timeout_s: float | None = None) -> dict:
    """Expand ``sweep_file`` and submit it as one job array plus a summary job; returns ids and paths."""
    sweep = load_sweep(sweep_file)
    sweep_dir = os.path.abspath(out or sweep.get("out") or os.path.join("sweeps", sweep["name"]))
    points = expand_sweep(sweep)
    os.makedirs(sweep_dir, exist_ok=True)
    manifest = {"name": sweep["name"], "file": sweep["_file"], "points": points, "metrics": sweep.get("metrics"),
                "commands": {p["name"]: ["distill", *fit_arguments(p, sweep["name"], sweep_dir)] for p in points}}
    _write_json(os.path.join(sweep_dir, "sweep.json"), manifest)
    info = {"sweep_dir": sweep_dir, "points": [p["name"] for p in points]}
    if dry_run:
        for name, command in manifest["commands"].items():
            print(name, " ".join(command))
        return info
    slurm = dict(sweep.get("slurm") or {})
    parallelism = slurm.pop("array_parallelism", None)
    executor = _executor(os.path.join(sweep_dir, "submitit", "%j"), cluster, slurm, sweep["name"])
    if parallelism is not None and executor.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=parallelism)
    jobs = executor.map_array(run_point, points, [sweep["name"]] * len(points), [sweep_dir] * len(points))
    array_id = str(jobs[0].job_id).split("_")[0]
    summary_executor = _executor(os.path.join(sweep_dir, "submitit", "%j"), cluster,
                                 {"timeout_min": 10, "cpus_per_task": 1, "nodes": 1, "tasks_per_node": 1,
                                  **({k: v for k, v in slurm.items() if k in ("partition", "slurm_partition")})},
                                 f"{sweep['name']}-summary")
    if executor.cluster == "slurm":
        summary_executor.update_parameters(slurm_additional_parameters={"dependency": f"afterany:{array_id}"})
        summary_job = summary_executor.submit(summarize, sweep_dir, None, True)
    else:
        for job in jobs:  # local executors: wait for the points, then summarise
            job.exception()
        summary_job = summary_executor.submit(summarize, sweep_dir, None, True)
    info.update({"array_job": array_id, "jobs": [str(j.job_id) for j in jobs], "summary_job": str(summary_job.job_id)})
    _write_json(os.path.join(sweep_dir, "submission.json"), info)
    print(f"sweep {sweep['name']}: {len(points)} points as job array {array_id} ({executor.cluster}); summary job "
          f"{summary_job.job_id} -> {os.path.join(sweep_dir, 'summary.md')}")
    if wait:
        deadline = None if timeout_s is None else time.time() + timeout_s
        summary_path = os.path.join(sweep_dir, "summary.json")
        while not (os.path.exists(summary_path) and summary_job.done()):
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"sweep {sweep['name']} not summarised after {timeout_s} s")
            time.sleep(poll_s)
        summarize(sweep_dir)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill sweep", description="Submit a sweep file as one Slurm job array "
                                     "(submitit) with a summary job, or summarise a sweep folder.")
    parser.add_argument("sweep_file", nargs="?", help="the sweep YAML")
    parser.add_argument("--out", help="sweep folder (default: the file's out:, else sweeps/<name>)")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None,
                        help="submitit executor (default: slurm when sbatch is present, else local)")
    parser.add_argument("--dry-run", action="store_true", help="expand and print the points' commands only")
    parser.add_argument("--wait", action="store_true", help="wait for the summary and print it")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    parser.add_argument("--summarize", metavar="DIR", help="(re)write DIR/summary.{md,csv,json} and print it")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0
    if not args.sweep_file:
        parser.error("give a sweep file or --summarize DIR")
    submit_sweep(args.sweep_file, out=args.out, cluster=args.cluster, dry_run=args.dry_run, wait=args.wait,
                 timeout_s=args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
