"""DisBack -- Distribution Backtracking Distillation (Zhang et al., ICLR 2025, arXiv:2408.15991,
"Distribution Backtracking Builds A Faster Convergence Trajectory for Diffusion Distillation").

Score distillation (DMD2 here) starts with a "score mismatch": the teacher's score is far from the initial student's
law, so early generator gradients are poor. DisBack walks the "real" score from the student's law back to the teacher.

Stage 1, Degradation Recording: a path network s' starts from the teacher and is fitted by denoising score
matching to samples of the INITIAL (frozen) student G_0,
    L(s') = lambda(t) ||s'(alpha_t x_0 + sigma_t eps, t) - x_0||^2,  x_0 = sg(G_0(z))        (the critic's DSM loss)
and checkpoints s'_0 (= teacher), s'_1, ..., s'_N are recorded along the way: the degradation path from the teacher's
score to (approximately) the initial student's score.
Stage 2, Distribution Backtracking: DMD2 (Yin et al. 2024, Eq. 2; see dmd2.py) where the "real" denoiser
is the path node s'_i, walked backwards i = N, N-1, ..., 1 and ending on the real teacher (index 0); the critic F is
trained as usual on student samples, starting from s'_N (our choice: the best available model of the initial
student's score; ``critic_from_path_end: false`` keeps DMD2's teacher initialisation):
    g = (p_i - p_fake) / mean_CHW |p_i|,  p = x_g - D(x_t),  D_i = s'_i (i > 0) or the teacher (i = 0)
Switching rule: one node per ``path_interval`` generator updates (the reference code switches on a fixed iteration
interval), so the walk takes N * path_interval generator updates and the rest of the run is plain DMD2.
(The two stages follow the paper's abstract and the authors' public code; its section and equation numbers could not
be checked here, so none are cited.)

Text-to-image (experiments/mnist_t2i/disback.yaml): stage 1's conditions are prompts instead of class labels -- each
sample's prompt drawn uniformly from the prompt datamodule's training prompts (``trainer.datamodule``, or
``attach_prompts``) and encoded by it, with ``path_label_dropout`` dropping to the empty / negative prompt; the prompt
set's hash is part of the recording's fingerprint and manifest. Stage 2 is unchanged (the path network is a copy of
the latent teacher and is guided like it).

Where the teacher has weights (MNIST: assets/mnist-teacher) the path network is a copy of it. The toy suite's exact
Gaussian-mixture teacher has none, so the path starts from the student's warm start (a network regressed onto the
exact teacher, see warm_start.py) and the final stage uses the exact teacher itself.

The path on disk: one safetensors file per node and ``manifest.json`` (format, node order, recording step, content
sha256, hash of the key set with shapes, the recording settings), every file written to a temporary name and renamed,
the manifest last. Before stage 2 every node is loaded STRICTLY into the path network; a missing, unexpected or
mis-shaped key raises DegradationPathError naming the file and the keys (the reference loads with strict=False and
mismatched key prefixes, which silently loads nothing). The current node index and the updates spent on it are
buffers, so they are in every Lightning checkpoint, with the path's directory and file checksums; a resumed run
reloads its node from that path and refuses a path that changed.

Running it (both stages in one ``distill fit``): with ``path_steps > 0`` stage 1 runs at the start of fit
(``on_fit_start``: after the warm start and any checkpoint restore, on the training device) and records into
``path_dir/<16 hex digits>``, a hash of the initial student, the start network and the stage-1 settings; an identical
recording already there is reused rather than recomputed, and no recording overwrites another. ``path_steps: 0``
reuses the path in ``path_dir`` itself (a recording directory, or one written by ``record_degradation_path`` /
``write_degradation_path``). A resumed run never records: the checkpoint marks the path recorded and names it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Callable

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..conditioning.condition import TextCondition, drop_conditions
from ..diffusion.guidance import classifier_free_guidance
from ..losses import denoising_score_matching, dsm_weight
from .dmd2 import DMD2

PATH_FORMAT = "disback-degradation-path/1"
MANIFEST = "manifest.json"


class DegradationPathError(RuntimeError):
    """A recorded path does not match the network it must load into, or is incomplete / modified."""


# ---------------------------------------------------------------------------------------------- the path on disk
def key_set_hash(state: dict[str, Tensor]) -> str:
    """sha256 of the sorted (key, shape) pairs: two state dicts with equal hashes load strictly into each other."""
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """sha256 of a state dict's content (keys, shapes, dtypes, values), independent of the file's byte layout
    (safetensors headers are not byte-reproducible)."""
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        value = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_sha256(network: nn.Module) -> str:
    """The identity of a network's current weights (a path's start, an initial student)."""
    return tensors_sha256(network.state_dict())


def _replace_atomically(temporary: str, final: str) -> None:
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def _cpu_state(network: nn.Module) -> dict[str, Tensor]:
    # safetensors refuses shared storage; detached contiguous copies also freeze the values at recording time
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in network.state_dict().items()}


def write_degradation_path(directory: str, nodes: list[tuple[int, dict[str, Tensor]]], **metadata) -> dict:
    """Write ``nodes`` [(recording step, state dict), ...] in path order (node 0 = the start, the teacher) and the
    manifest; returns the manifest. An existing manifest is removed first, so a crash mid-write leaves no manifest
    (an unusable path) rather than a manifest describing a mix of old and new files."""
    if not nodes:
        raise ValueError("a degradation path needs at least one node")
    hashes = {key_set_hash(state) for _, state in nodes}
    if len(hashes) != 1:
        raise DegradationPathError("the nodes of one degradation path must share one key set")
    os.makedirs(directory, exist_ok=True)
    manifest_path = os.path.join(directory, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    entries = []
    for index, (step, state) in enumerate(nodes):
        name = f"node_{index:03d}_step_{int(step):07d}.safetensors"
        final = os.path.join(directory, name)
        save_file(state, final + ".tmp", metadata={"format": PATH_FORMAT, "index": str(index), "step": str(step)})
        _replace_atomically(final + ".tmp", final)
        entries.append({"index": index, "step": int(step), "file": name, "sha256": tensors_sha256(state)})
    manifest = {"format": PATH_FORMAT,
                "order": "recording order: node 0 is the start (the teacher), the last node is nearest the initial "
                         "student's law; distillation walks it from the last node back to the teacher",
                "key_set_hash": hashes.pop(), "num_keys": len(nodes[0][1]), "nodes": entries, **metadata}
    with open(manifest_path + ".tmp", "w") as handle:
        json.dump(manifest, handle, indent=1)
    _replace_atomically(manifest_path + ".tmp", manifest_path)
    return manifest


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise DegradationPathError(f"no degradation path at {directory!r} ({MANIFEST} is missing): record one with "
                                   "path_steps > 0, or point path_dir at a recorded path")
    with open(path) as handle:
        manifest = json.load(handle)
    if manifest.get("format") != PATH_FORMAT:
        raise DegradationPathError(f"{path}: format {manifest.get('format')!r} is not {PATH_FORMAT!r}")
    indices = [node["index"] for node in manifest["nodes"]]
    if indices != list(range(len(indices))) or len(indices) < 2:
        raise DegradationPathError(f"{path}: node indices {indices} must be 0, 1, ..., N with N >= 1")
    return manifest


def _short(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_node_strictly(network: nn.Module, directory: str, node: dict, manifest: dict | None = None) -> None:
    """Load one path node into ``network``; any missing / unexpected / mis-shaped key, or a file that is not the one
    the manifest recorded, raises DegradationPathError naming the file and the keys."""
    path = os.path.join(directory, node["file"])
    if not os.path.isfile(path):
        raise DegradationPathError(f"degradation path node {path} is missing")
    tensors = load_file(path)
    expected = network.state_dict()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    misshaped = [f"{key} (file {tuple(tensors[key].shape)}, network {tuple(expected[key].shape)})"
                 for key in sorted(set(expected) & set(tensors)) if tensors[key].shape != expected[key].shape]
    if missing or unexpected or misshaped:
        problems = [f"missing keys [{_short(missing)}]" if missing else "",
                    f"unexpected keys [{_short(unexpected)}]" if unexpected else "",
                    f"mis-shaped keys [{'; '.join(misshaped[:8])}]" if misshaped else ""]
        raise DegradationPathError(f"degradation path node {path} does not load strictly into "
                                   f"{type(network).__name__}: " + "; ".join(p for p in problems if p))
    if node.get("sha256") and tensors_sha256(tensors) != node["sha256"]:
        raise DegradationPathError(f"degradation path node {path} changed after recording (sha256 differs from "
                                   f"{os.path.join(directory, MANIFEST)})")
    if manifest is not None and manifest.get("key_set_hash") not in (None, key_set_hash(tensors)):
        raise DegradationPathError(f"degradation path node {path}: key set differs from the manifest's")
    network.load_state_dict(tensors, strict=True)


def verify_degradation_path(network: nn.Module, directory: str) -> dict:
    """Load every node of the path at ``directory`` strictly into ``network`` (left holding the last node); returns
    the manifest."""
    manifest = read_manifest(directory)
    for node in manifest["nodes"]:
        load_node_strictly(network, directory, node, manifest)
    return manifest


def record_degradation_path(network: nn.Module, sample_student: Callable, schedule, directory: str, steps: int,
                            checkpoints: int, time_sampler, weighting: str = "edm", lr: float = 1e-4,
                            batch_size: int = 256, seed: int = 0, null_label: int | None = None,
                            label_dropout: float = 0.0, **metadata) -> dict:
    """Stage 1 (Degradation Recording): fit a copy of ``network`` (which holds the teacher's score) to samples of the
    initial student by denoising score matching for ``steps`` Adam steps, recording it at step 0 and at ``checkpoints``
    evenly spaced steps up to ``steps``. ``sample_student(n, generator) -> (x0, cond)`` draws without gradient.
    Conditional paths see the null label (prompts: the empty / negative prompt) with probability ``label_dropout`` so
    the unconditional branch used by guidance degrades too. Seeded and RNG-isolated, so every rank would record the same path. Returns the manifest
    with the per-step losses under "losses"."""
    if steps < 1 or not 1 <= checkpoints <= steps:
        raise ValueError(f"need steps >= 1 and 1 <= checkpoints <= steps, got steps={steps}, checkpoints={checkpoints}")
    record_at = {round(i * steps / checkpoints) for i in range(1, checkpoints + 1)}
    generator = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(network).requires_grad_(True).train()
    device = next(work.parameters()).device
    optimizer = torch.optim.Adam(work.parameters(), lr=lr)
    nodes, losses = [(0, _cpu_state(work))], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for step in range(1, steps + 1):
            x0, cond = sample_student(batch_size, generator)
            x0 = x0.detach()
            t = time_sampler(batch_size, schedule, generator).to(device)
            noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
            x_t = schedule.add_noise(x0, noise, t)
            if cond is not None and label_dropout > 0 and (null_label is not None or isinstance(cond, TextCondition)):
                # class labels drop to the null label, prompts to their empty / negative prompt
                drop = (torch.rand(batch_size, generator=generator) < label_dropout).to(cond.device)
                cond = drop_conditions(cond, drop, null_label)
            loss = denoising_score_matching(work(x_t, t, cond), x0, dsm_weight(schedule, t, weighting)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if step in record_at:
                nodes.append((step, _cpu_state(work)))
    metadata = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "weighting": weighting,
                "dsm_loss_first_last": [losses[0], losses[-1]], **metadata}
    manifest = write_degradation_path(directory, nodes, **metadata)
    return {**manifest, "losses": losses}


# ---------------------------------------------------------------------------------------------- the method
class DisBack(DMD2):
    """DMD2 whose "real" denoiser walks a recorded degradation path backwards (see the module docstring).

    path_dir: the root recordings go to (default ``<trainer.default_root_dir>/degradation_paths``), or with
    path_steps 0 the recorded path to use; path_steps: stage-1 DSM steps; path_checkpoints: nodes recorded after the
    start (evenly spaced in steps);
    path_interval: generator updates per node in stage 2; path_lr / path_batch_size: stage-1 Adam lr and batch;
    path_label_dropout: null-label rate in stage 1 for conditional networks; critic_from_path_end: start the critic
    from the last node (else it keeps DMD2's initialisation)."""

    def __init__(self, *args, path_dir: str | None = None, path_steps: int = 0, path_checkpoints: int = 4,
                 path_interval: int = 100, path_lr: float = 1e-4, path_batch_size: int = 256,
                 path_label_dropout: float = 0.1, critic_from_path_end: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value, low in [("path_steps", path_steps, 0), ("path_checkpoints", path_checkpoints, 1),
                                 ("path_interval", path_interval, 1), ("path_batch_size", path_batch_size, 1)]:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if path_lr <= 0:
            raise ValueError(f"path_lr must be > 0, got {path_lr}")
        if not 0.0 <= path_label_dropout < 1.0:
            raise ValueError(f"path_label_dropout must be in [0, 1), got {path_label_dropout}")
        if path_steps == 0 and path_dir is None:
            raise ValueError("path_steps=0 reuses a recorded path: set path_dir to its directory")
        if path_steps and path_checkpoints > path_steps:
            raise ValueError(f"path_checkpoints ({path_checkpoints}) cannot exceed path_steps ({path_steps})")
        self.path_dir, self.path_steps, self.path_checkpoints = path_dir, path_steps, path_checkpoints
        self.path_interval, self.path_lr, self.path_batch_size = path_interval, path_lr, path_batch_size
        self.path_label_dropout, self.critic_from_path_end = path_label_dropout, critic_from_path_end
        # The path starts from the teacher's weights; an exact (weightless) teacher is represented by the student's
        # warm start, a network regressed onto it.
        self.teacher_has_weights = next(self.teacher.parameters(), None) is not None
        if path_steps > 0 and not self.teacher_has_weights and self.hparams.warm_start_steps == 0:
            raise ValueError("path_steps > 0 with a weightless (exact) teacher needs warm_start_steps > 0: the path "
                             "starts from the student's warm start, a network regressed onto the teacher")
        # an explicit, frozen copy (never in an optimizer); its weights are swapped node by node
        self.path_network = copy.deepcopy(self.teacher if self.teacher_has_weights else self.student)
        self.path_network.requires_grad_(False).eval()
        self.register_buffer("path_recorded", torch.tensor(False), persistent=True)
        #: the node the generator is matched to: N, ..., 1 (recorded nodes), 0 = the teacher; -1 before stage 2
        self.register_buffer("path_index", torch.tensor(-1, dtype=torch.long), persistent=True)
        self.register_buffer("path_updates_on_node", torch.tensor(0, dtype=torch.long), persistent=True)
        #: the recorded path in use (a recording directory, or path_dir itself when path_steps is 0)
        self.active_path_dir: str | None = None
        self._path_manifest: dict | None = None
        self._loaded_node: int | None = None
        self._real_from_path = False
        self._prompt_source = None

    def attach_prompts(self, datamodule) -> None:
        """The prompt datamodule stage 1 samples its conditions from on a text-conditioned teacher (fit uses
        ``trainer.datamodule``)."""
        self._prompt_source = datamodule

    def _prompt_set(self):
        """(datamodule, training prompts, their concept ids or None) for text-conditioned recording."""
        source = self._prompt_source
        if source is None and self._trainer is not None:
            source = self.trainer.datamodule
        if source is None or not hasattr(source, "conditions") or not getattr(source, "prompts", None):
            raise ValueError("DisBack on a text-conditioned teacher records stage 1 on prompts of the prompt "
                             "datamodule (PromptDataModule): run under trainer.fit with one, or call "
                             "attach_prompts(datamodule)")
        source.setup("fit")
        return source, list(source.prompts), getattr(source, "labels", None)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "path_network", None) is not None:
            self.path_network.eval()  # a frozen target, like the teacher
        return self

    # ------------------------------------------------------------------ stage 1 and the hand-over to stage 2
    def on_fit_start(self) -> None:
        # After the warm start, any checkpoint restore and the move to the device (stage 1 runs on the accelerator):
        # a restored run carries path_recorded / path_index and its path directory, so it never records again.
        super().on_fit_start()
        self.prepare_path()

    def prepare_path(self) -> dict:
        """Stage 1 when needed, strict verification of every node, then the start of stage 2 (idempotent: a second
        call re-verifies only). Returns the manifest."""
        if not bool(self.path_recorded):
            if self.path_steps > 0:
                self.active_path_dir = self._record_or_reuse()
            else:
                self.active_path_dir = self.path_dir
            self.path_recorded.fill_(True)
        if self.active_path_dir is None:
            raise DegradationPathError("the checkpoint marks the path as recorded but names no path directory")
        self._path_manifest = verify_degradation_path(self.path_network, self.active_path_dir)
        self._loaded_node = None
        if int(self.path_index) < 0:
            last = len(self._path_manifest["nodes"]) - 1
            if self.critic_from_path_end:
                load_node_strictly(self.critic, self.active_path_dir, self._path_manifest["nodes"][last],
                                   self._path_manifest)
            self.path_index.fill_(last)
            self.path_updates_on_node.zero_()
        return self._path_manifest

    def _path_root(self) -> str:
        if self.path_dir is not None:
            return self.path_dir
        if self._trainer is None:
            raise ValueError("DisBack needs path_dir when it runs outside a Trainer")
        return os.path.join(self.trainer.default_root_dir, "degradation_paths")

    def recording_settings(self) -> dict:
        """Everything stage 1's result depends on (the path network must hold the start); its hash names the
        recording's directory."""
        sampler = self.critic_time_sampler
        return {"format": PATH_FORMAT, "steps": self.path_steps, "checkpoints": self.path_checkpoints,
                "lr": self.path_lr, "batch_size": self.path_batch_size, "seed": self.hparams.seed,
                "weighting": self.critic_weighting, "label_dropout": self.path_label_dropout,
                "time_sampler": f"{type(sampler).__name__}{sorted(vars(sampler).items())}",
                "student_times": self.student_times.tolist(), "start_sha256": state_sha256(self.path_network),
                "initial_student_sha256": state_sha256(self.student), **self._prompt_settings()}

    def _prompt_settings(self) -> dict:
        """For a text-conditioned teacher: the identity of the prompt set stage 1 samples (part of the fingerprint,
        so another prompt set records another path); nothing for class labels (their fingerprints are unchanged)."""
        if not getattr(self.teacher, "text_conditioned", False):
            return {}
        _, prompts, _ = self._prompt_set()
        return {"conditions": "prompts", "num_prompts": len(prompts),
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}

    def _record_or_reuse(self) -> str:
        """Record into <root>/<fingerprint>; a directory already holding this exact recording is reused, and no
        recording ever overwrites another."""
        # the start: the teacher's weights, or for a weightless teacher the warm start regressed onto it
        self.path_network.load_state_dict((self.teacher if self.teacher_has_weights else self.student).state_dict())
        settings = self.recording_settings()
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        directory = os.path.join(self._path_root(), fingerprint[:16])
        manifest_path = os.path.join(directory, MANIFEST)
        reuse = os.path.isfile(manifest_path) and read_manifest(directory).get("fingerprint") == fingerprint
        if not reuse and (self._trainer is None or self.trainer.is_global_zero):
            self.record_path(directory, fingerprint=fingerprint, settings=settings)
        if self._trainer is not None:  # every rank, whatever it decided: the others read rank 0's files next
            self.trainer.strategy.barrier("disback-degradation-path")
        rank_zero_info(f"DisBack: {'reusing' if reuse else 'recorded'} the degradation path at {directory}")
        return directory

    def record_path(self, directory: str, **metadata) -> dict:
        """Stage 1 on this module's frozen initial student (the path network holds the start)."""
        shape = self.teacher.data_shape
        if shape is None:
            raise ValueError(f"recording a degradation path needs the data shape; {type(self.teacher).__name__} "
                             "does not report one")
        if getattr(self.teacher, "text_conditioned", False):
            # prompts: each stage-1 sample's condition is a training prompt drawn uniformly (with its concept id where
            # the prompt set has one), encoded by the prompt datamodule -- the text analogue of the sampled labels
            source, prompts, labels = self._prompt_set()
            label_table = None if labels is None else torch.as_tensor(labels)

            def sample_student(n: int, generator: torch.Generator):
                noise = torch.randn((n, *shape), generator=generator).to(self.device)
                index = torch.randint(len(prompts), (n,), generator=generator)
                cond = source.conditions([prompts[i] for i in index.tolist()],
                                         None if label_table is None else label_table[index]).to(self.device)
                with torch.no_grad():
                    return self.generator_training_sample({"noise": noise, "cond": cond}), cond
            conditional, classes = True, None
        else:
            classes = getattr(self.path_network, "num_classes", 0) or 0
            conditional = classes > 0 and (getattr(self.teacher, "num_classes", 0) or 0) > 0
            law = getattr(self.teacher, "law", None)
            class_weights = law.class_weights() if law is not None and conditional else torch.ones(max(classes, 1))

            def sample_student(n: int, generator: torch.Generator):
                noise = torch.randn((n, *shape), generator=generator).to(self.device)
                cond = torch.multinomial(class_weights, n, replacement=True, generator=generator).to(self.device) \
                    if conditional else None
                with torch.no_grad():
                    return self.generator_training_sample({"noise": noise, "cond": cond}), cond
            classes = classes if conditional else None

        return record_degradation_path(
            self.path_network, sample_student, self.schedule, directory, self.path_steps, self.path_checkpoints,
            self.critic_time_sampler, self.critic_weighting, self.path_lr, self.path_batch_size,
            seed=self.hparams.seed, null_label=classes,
            label_dropout=self.path_label_dropout if conditional else 0.0, method="DisBack",
            start="teacher weights" if self.teacher_has_weights else "student warm start regressed onto the teacher",
            **metadata)

    # ------------------------------------------------------------------ stage 2: the real denoiser walks the path
    def _sync_path_network(self) -> int:
        """The current node index, with its weights in the path network (loaded strictly on a switch or restore)."""
        index = int(self.path_index)
        if index < 0:
            raise RuntimeError("DisBack's degradation path is not set up: call prepare_path() (fit does)")
        if index > 0 and self._loaded_node != index:
            directory = self.active_path_dir
            if directory is None:
                raise RuntimeError("DisBack's degradation path is not set up: call prepare_path() (fit does)")
            if self._path_manifest is None:
                self._path_manifest = read_manifest(directory)
            nodes = self._path_manifest["nodes"]
            if index >= len(nodes):
                raise DegradationPathError(f"path index {index} is beyond the {len(nodes)} nodes at {directory}")
            load_node_strictly(self.path_network, directory, nodes[index], self._path_manifest)
            self._loaded_node = index
        return index

    def path_x0(self, x_t: Tensor, t: Tensor, cond: Tensor | None, guidance_scale=None) -> Tensor:
        """The current path node's x0 estimate, guided like the teacher (the path network inherits its null label)."""
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        guided = cond is not None and (torch.is_tensor(scale) or scale != 1.0)
        null = self.unconditional(cond) if guided else None
        return classifier_free_guidance(self.path_network, x_t, t, cond, null, scale)

    def teacher_x0(self, x_t, t, cond, guidance_scale=None):
        # Only the generator loss sees the path; teacher sampling and the warm start keep the real teacher.
        if self._real_from_path and int(self.path_index) > 0:
            return self.path_x0(x_t, t, cond, guidance_scale)
        return super().teacher_x0(x_t, t, cond, guidance_scale)

    def generator_loss(self, batch):
        index = self._sync_path_network()
        self._real_from_path = True
        try:
            losses = super().generator_loss(batch)
        finally:
            self._real_from_path = False
        losses["path_index"] = torch.tensor(float(index), device=losses["loss"].device)
        return losses

    def on_generator_step_end(self) -> None:
        """The switching rule: one node back every ``path_interval`` generator updates, ending on the teacher."""
        super().on_generator_step_end()
        if int(self.path_index) > 0:
            self.path_updates_on_node += 1
            if int(self.path_updates_on_node) >= self.path_interval:
                self.path_index -= 1
                self.path_updates_on_node.zero_()

    # ------------------------------------------------------------------ resume safety
    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.active_path_dir is not None and self._path_manifest is not None:
            checkpoint["disback_path"] = {"directory": self.active_path_dir,
                                          "files": [n["sha256"] for n in self._path_manifest["nodes"]]}

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self._loaded_node = None  # reload the saved index's node from disk at the next generator update
        saved = checkpoint.get("disback_path")
        if saved is None:
            return
        current = read_manifest(saved["directory"])
        if [n["sha256"] for n in current["nodes"]] != saved["files"]:
            raise DegradationPathError(
                f"the degradation path at {saved['directory']} differs from the one this checkpoint was trained on; "
                "resume with the original path")
        self.active_path_dir, self._path_manifest = saved["directory"], current
