"""SFD -- Score Forgetting Distillation (Chen, Zhang & Zhou, ICLR 2025, arXiv:2409.11219).

(The paper's text beyond the abstract was not reachable when this was written, so no equation numbers are cited; the
loss below was checked against the authors' released code and configuration, read for facts, not copied.)

A one-step class-conditional student that no longer generates the "forget" classes C_f while every other class keeps
its quality. SFD builds on SiD (score identity distillation, sid.py): the distillation loss of the kept classes is
SiD's, and the forgetting ("machine unlearning") loss is the same SiD loss in which, for a sample generated for a
forget class c_f, the teacher's score is taken at an override class c_o ("cross-class score distillation": the
conditional score of the unsafe class is aligned with that of a safe one), while the fake score stays at c_f, where it
models the student's own law for c_f. The unlearning term enters as a weighted regulariser of the distillation
objective; the fixed point of the forget term is G(z, c_f) ~ p_data(x | c_o).

Algorithm (per batch of labels c; o(c) = c_o for c in C_f, o(c) = c otherwise):
  critic F:     x_g = sg(G(z, c)); sigma ~ lognormal(-1.2, 1.2)
                L_F = w_F(c) lambda_EDM(sigma) ||F(x_g + sigma n, c) - x_g||^2          (DSM at the requested label)
  generator G:  x_g = G(z, c); x_t = x_g + sigma n (gradient kept, SiD)
                y_r = T(x_t, o(c)), y_f = F(x_t, c),  w = sg(mean |x_g - y_r|)
                L_G = w_G(c) (y_r - y_f) . [(y_r - x_g) - alpha (y_r - y_f)] / w       (SiD Eq. 23 with the override)
  with w_G(c) = ``forget_weight`` and w_F(c) = ``critic_forget_weight`` for c in C_f, 1 otherwise.

Choices, checked against the abstract and the authors' released configuration (tqch/score-forgetting-distillation):
  * score distillation = SiD with alpha = 1.2 (their ``model.type: sid``, ``alpha: 1.2``); the student starts as a
    copy of the teacher (the framework's default).
  * override: one fixed class (their default: forget 0, override 1), or -- when ``override_classes`` lists several,
    or is left out (= every kept class) -- a class drawn uniformly per sample (their ``pseudo_label_type: rand``).
  * the fake score is also trained on the forget class's samples, at the forget label (their ``sg_forget_coef``).
  * weights: they use separate equal-sized kept and forget batches with forget coefficients 0.01 for both networks.
    Here one batch holds every class with its data frequency, and the weights are per sample. They set how fast the
    forget class moves, not where it ends (with enough capacity each class's fixed point is the same for any positive
    weight), so the defaults are 1.0 -- forgetting within a short run; ``forget_weight: 0.01`` gives their per-sample
    ratio of forget to kept weight.

Text-to-image (concept forgetting; a prompt-conditioned teacher such as experiments/mnist_t2i/sfd.yaml). The class-id
mechanism carries over with prompt substitution: the teacher's score for a forgotten prompt is taken at an override
prompt, the fake score stays at the forgotten prompt, and c -> o(c) above becomes prompt -> override prompt.
  * which prompts are forgotten: ``forget_classes`` applied to the prompts' concept ids (``TextCondition.labels``,
    from the prompt datamodule's ``label_parser`` / ``label_column``; needs ``num_concepts``), and / or the exact
    prompt texts in ``forget_prompts`` (matched against the batch's ``prompts``).
  * the override prompt: ``override_prompts`` (forgotten prompt -> its override prompt), else ``recaption`` -- whole
    words replaced at once, e.g. {"zero": "one"} re-captions "a thin handwritten zero, slanted left" as "a thin
    handwritten one, slanted left", so the override keeps every other attribute of the prompt (the paper's
    cross-class override with the rest of the condition held fixed). Override prompts are encoded once with the
    prompt datamodule's encoder (``trainer.datamodule``, or ``attach_prompts``) and cached. The unconditional branch
    of guidance (empty / negative prompt) and the guidance scale stay the sample's own.
  * neither given (concept ids only): the override is a prompt of an override concept drawn uniformly from the same
    batch (the analogue of the random pseudo-label); a batch without one is an error.
The paper (abstract) reports class-conditional and text-to-image experiments; the re-captioning rule and the explicit
prompt map are this framework's concrete form of "the override concept's score", not taken from its code.

Evaluation (below): ``forgetting_report`` classifies a trained module's samples (the fraction classified as each
forgotten class), ``kept_classes_fid`` is the FID of the kept classes only (run it on the plain DMD2 / SiD student
too, for the comparison), and ``forgetting_target_law`` is the exact law an SFD student should reach on a toy mixture.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import torch
from torch import Tensor

from ..conditioning.condition import TextCondition, condition_labels, select_conditions
from ..networks.gaussian_mixture import GaussianMixture
from .sid import SiD, sid_generator_loss


def _as_classes(values, name: str, kind: str, num_classes: int) -> list[int]:
    """``values`` as distinct class indices of a ``num_classes``-class teacher, or a ValueError naming the bad one."""
    classes = [int(v) for v in values]
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"{name} lists class {duplicates[0]} more than once: {classes}")
    for label in classes:
        if not 0 <= label < num_classes:
            raise ValueError(f"{kind} class {label} is outside 0..{num_classes - 1}")
    return classes


class SFD(SiD):
    # Clipping: SFD keeps the framework's norm-10 clipping rather than SiD's none (the authors' release,
    # github.com/tqch/score-forgetting-distillation, clips both networks' gradients by value, not by norm).
    def __init__(self, *args, forget_classes: Sequence[int] = (), override_classes: Sequence[int] | None = None,
                 forget_weight: float = 1.0, critic_forget_weight: float = 1.0, num_concepts: int | None = None,
                 forget_prompts: Sequence[str] = (), recaption: dict[str, str] | None = None,
                 override_prompts: dict[str, str] | None = None,
                 generator_clip_norm: float | None = 10.0, critic_clip_norm: float | None = 10.0, **kwargs):
        super().__init__(*args, generator_clip_norm=generator_clip_norm, critic_clip_norm=critic_clip_norm, **kwargs)
        prompted = self.teacher.text_conditioned
        forget_prompts = [str(p) for p in forget_prompts]
        recaption, override_prompts = dict(recaption or {}), dict(override_prompts or {})
        if not prompted and (forget_prompts or recaption or override_prompts):
            raise ValueError("forget_prompts / recaption / override_prompts are for a prompt-conditioned teacher; a "
                             "class-conditional teacher forgets forget_classes")
        if prompted and not forget_classes and not forget_prompts:
            raise ValueError("SFD on a prompt-conditioned teacher needs forget_classes (concept ids of the prompts' "
                             "labels) or forget_prompts (prompts to forget)")
        if prompted and forget_classes and num_concepts is None:
            raise ValueError("SFD on a prompt-conditioned teacher needs num_concepts (the number of concept ids in "
                             "the prompts' label column)")
        if prompted and forget_prompts and not (recaption or override_prompts):
            missing = [p for p in forget_prompts if p not in override_prompts]
            raise ValueError(f"forget_prompts {missing[:3]} need their override: give recaption (word -> word) or "
                             "override_prompts (prompt -> prompt); a batch-drawn override needs concept ids")
        for source, target in [*recaption.items(), *override_prompts.items()]:
            if not str(source).strip() or not str(target).strip() or source == target:
                raise ValueError(f"recaption / override_prompts entry {source!r} -> {target!r} must map a non-empty "
                                 "text to a different non-empty text")
        if prompted and not forget_classes:
            num_classes = 0
        else:
            num_classes = int(num_concepts if prompted else (getattr(self.teacher, "num_classes", 0) or 0))
            if num_classes < 2:
                raise ValueError(f"SFD needs a class-conditional teacher with at least 2 classes (or prompts of at "
                                 f"least 2 concepts), got {num_classes}")
        if not prompted and not (getattr(self.student, "num_classes", 0) or 0):
            raise ValueError("SFD needs a class-conditional student (e.g. ToyMLPDenoiser num_classes, or leave student "
                             "unset to copy the teacher)")
        forget = _as_classes(forget_classes, "forget_classes", "forget", num_classes) if num_classes else []
        if not forget and not forget_prompts:
            raise ValueError("forget_classes is empty: name at least one class to forget")
        if not num_classes:
            override = []
        elif override_classes is None:
            override = [c for c in range(num_classes) if c not in forget]
        else:
            override = _as_classes(override_classes, "override_classes", "override", num_classes)
        if num_classes and not override:
            raise ValueError("no override class: every class is forgotten; keep at least one")
        for label in override:
            if label in forget:
                raise ValueError(f"override class {label} is also a forget class")
        if not forget_weight > 0:
            raise ValueError(f"forget_weight must be > 0 (0 would not forget), got {forget_weight}")
        if critic_forget_weight < 0:
            raise ValueError(f"critic_forget_weight must be >= 0, got {critic_forget_weight}")
        self.forget_classes, self.override_classes = forget, override
        self.forget_prompts, self.recaption, self.override_prompts = forget_prompts, recaption, override_prompts
        self._recaption_pattern = None if not recaption else re.compile(
            r"\b(" + "|".join(re.escape(word) for word in sorted(recaption, key=len, reverse=True)) + r")\b")
        self._override_cache: dict[str, TextCondition] = {}
        self._prompt_source = None
        self.forget_weight, self.critic_forget_weight = float(forget_weight), float(critic_forget_weight)
        self.register_buffer("_forget_table", torch.tensor(forget, dtype=torch.long), persistent=False)
        self.register_buffer("_override_table", torch.tensor(override, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ labels
    def _labels(self, batch: dict) -> Tensor:
        cond = batch.get("cond")
        if cond is None:
            raise ValueError("SFD needs class labels in the batch (a class-conditional datamodule, e.g. "
                             "ToyMixtureDataModule conditional: true, or MNISTDataModule), or labelled prompts")
        if self.forget_classes:
            condition_labels(cond, "SFD")  # prompts must carry their concept id
        return cond

    def is_forgotten(self, cond) -> Tensor:
        labels = condition_labels(cond, "SFD")
        return torch.isin(labels.long(), self._forget_table.to(labels.device))

    def forgotten(self, batch: dict) -> Tensor:
        """(B,) bool: the samples to forget -- a forget class / concept id, or (prompts) a prompt in forget_prompts."""
        cond = batch.get("cond")
        mask = self.is_forgotten(cond) if self.forget_classes else torch.zeros(len(cond), dtype=torch.bool,
                                                                               device=cond.device)
        if self.forget_prompts:
            prompts = batch.get("prompts")
            if prompts is None:
                raise ValueError("SFD forget_prompts needs the prompt texts in the batch (PromptDataModule's "
                                 "'prompts')")
            wanted = set(self.forget_prompts)
            mask = mask | torch.tensor([p in wanted for p in prompts], dtype=torch.bool, device=mask.device)
        return mask

    def override_labels(self, cond: Tensor) -> Tensor:
        """One override class per sample: the fixed one, or a uniform draw from ``override_classes``."""
        table = self._override_table.to(cond.device)
        if len(table) == 1:
            return table.expand(cond.shape[0]).to(cond.dtype)
        return table[torch.randint(len(table), (cond.shape[0],), device=cond.device)].to(cond.dtype)

    def teacher_labels(self, cond, forgotten: Tensor | None = None):
        """o(c): the condition the teacher's score is taken at (the override for forget classes, else c itself).

        Prompts without a re-captioning rule (concept forgetting by id): a forgotten prompt's teacher condition is
        the condition of a prompt of an override concept drawn uniformly from the same batch -- the prompt-set
        analogue of the per-sample override class draw (a batch without any prompt of an override concept is an
        error naming the concepts)."""
        if not isinstance(cond, TextCondition):
            return torch.where(self.is_forgotten(cond), self.override_labels(cond), cond)
        forgotten = self.is_forgotten(cond) if forgotten is None else forgotten
        if not forgotten.any():
            return cond
        candidates = torch.isin(cond.labels.long(), self._override_table.to(cond.device)).nonzero(as_tuple=True)[0]
        if len(candidates) == 0:
            raise ValueError(f"SFD: this batch has forgotten prompts but no prompt of an override concept "
                             f"{self._override_table.tolist()}; use larger batches or more override prompts, or "
                             "give recaption / override_prompts")
        donors = candidates[torch.randint(len(candidates), (len(cond),), device=cond.device)]
        source = torch.where(forgotten, donors, torch.arange(len(cond), device=cond.device))
        override = select_conditions(cond, source)
        return dataclasses.replace(override, null_embeds=cond.null_embeds, null_pooled=cond.null_pooled,
                                   null_mask=cond.null_mask, guidance=cond.guidance)

    # ------------------------------------------------------------------ prompt substitution (text-to-image)
    def attach_prompts(self, datamodule) -> None:
        """The prompt datamodule whose encoder encodes override prompts (fit uses ``trainer.datamodule``)."""
        self._prompt_source = datamodule

    def override_prompt(self, prompt: str) -> str:
        """The override concept's prompt for a forgotten prompt: ``override_prompts[prompt]``, else the prompt
        re-captioned by ``recaption`` (whole words, all at once: {"three": "one"} turns "a thin handwritten three"
        into "a thin handwritten one")."""
        if prompt in self.override_prompts:
            return self.override_prompts[prompt]
        if self._recaption_pattern is not None:
            target = self._recaption_pattern.sub(lambda match: self.recaption[match.group(1)], prompt)
            if target != prompt:
                return target
        raise ValueError(f"SFD: forgotten prompt {prompt!r} has no override: no override_prompts entry and no "
                         f"recaption word {sorted(self.recaption)} in it")

    def _encode_prompts(self, prompts: list[str]) -> TextCondition:
        source = self._prompt_source
        if source is None and self._trainer is not None:
            source = self.trainer.datamodule
        if source is None or not hasattr(source, "evaluation_conditions"):
            raise ValueError("SFD recaption / override_prompts encode the override prompts with the prompt "
                             "datamodule's encoder: run under trainer.fit with a PromptDataModule, or call "
                             "attach_prompts(datamodule)")
        missing = [p for p in dict.fromkeys(prompts) if p not in self._override_cache]
        if missing:
            encoded = source.evaluation_conditions(missing)
            for row, prompt in enumerate(missing):
                self._override_cache[prompt] = select_conditions(encoded, torch.tensor([row]))
        parts = [self._override_cache[p] for p in prompts]
        return TextCondition(**{field.name: None if getattr(parts[0], field.name) is None
                                else torch.cat([getattr(part, field.name) for part in parts])
                                for field in dataclasses.fields(TextCondition)})

    def teacher_conditions(self, batch: dict, forgotten: Tensor | None = None):
        """The conditions the teacher is evaluated at: each forgotten sample's override (class, re-captioned or
        mapped prompt, or a batch-drawn prompt of an override concept), every other sample's own condition. The
        unconditional branch of guidance and the guidance scale stay the sample's own."""
        cond = batch.get("cond")
        forgotten = self.forgotten(batch) if forgotten is None else forgotten
        if not isinstance(cond, TextCondition) or not (self.recaption or self.override_prompts):
            return self.teacher_labels(cond, forgotten) if isinstance(cond, TextCondition) else self.teacher_labels(cond)
        if not forgotten.any():
            return cond
        prompts = batch.get("prompts")
        if prompts is None:
            raise ValueError("SFD recaption / override_prompts need the prompt texts in the batch "
                             "(PromptDataModule's 'prompts')")
        rows = forgotten.nonzero(as_tuple=True)[0]
        override = self._encode_prompts([self.override_prompt(prompts[int(i)]) for i in rows]).to(cond.device)
        values = {}
        for field in ("embeds", "pooled", "mask", "labels"):
            own, new = getattr(cond, field), getattr(override, field)
            if own is None or new is None:
                values[field] = own
                continue
            if own.shape[1:] != new.shape[1:]:
                raise ValueError(f"SFD: the override prompts' {field} {tuple(new.shape[1:])} differ from the batch's "
                                 f"{tuple(own.shape[1:])}; encode both with the same encoder")
            values[field] = own.index_copy(0, rows, new.to(own.dtype))
        return dataclasses.replace(cond, **values)

    def forget_weights(self, cond, forget_weight: float, forgotten: Tensor | None = None) -> Tensor:
        forgotten = self.is_forgotten(cond) if forgotten is None else forgotten
        return torch.where(forgotten, forget_weight, 1.0).to(torch.float64)

    # ------------------------------------------------------------------ losses
    def generator_loss(self, batch):
        cond = self._labels(batch)
        forgotten = self.forgotten(batch)
        x_g = self.generator_training_sample(batch)
        x_t, t = self.noised(x_g, self.generator_time_sampler, with_gradient=True)
        y_real = self.teacher_x0(x_t, t, self.teacher_conditions(batch, forgotten))   # cross-class / override prompt
        y_fake = self.critic(x_t, t, cond)                             # the student's own law at the requested label
        finite = torch.stack([v.flatten(1).isfinite().all(1) for v in (x_g, y_real, y_fake)]).all(0)
        per_sample = sid_generator_loss(x_g[finite], y_real[finite], y_fake[finite], self.alpha)
        weights = self.forget_weights(cond, self.forget_weight, forgotten)[finite].to(per_sample.dtype)
        losses = {"loss": (weights * per_sample).mean(), "finite_fraction": finite.float().mean()}
        kept, forget = per_sample[~forgotten[finite]], per_sample[forgotten[finite]]
        if len(kept):
            losses["distillation"] = kept.detach().mean()
        if len(forget):
            losses["forgetting"] = forget.detach().mean()
        return losses

    def critic_loss(self, batch):
        cond = self._labels(batch)
        with torch.no_grad():
            x_g = self.generator_training_sample(batch)
        denoising, _, _ = self.critic_denoising_loss(x_g, cond)
        weights = self.forget_weights(cond, self.critic_forget_weight, self.forgotten(batch)).to(denoising.dtype)
        return {"loss": (weights * denoising).mean()}


# --------------------------------------------------------------------------------------------------- ground truth
def forgetting_target_law(law: GaussianMixture, forget_classes: Sequence[int],
                          override_classes: Sequence[int] | None = None) -> GaussianMixture:
    """The law of a perfect SFD student when labels are drawn with the law's class weights: the forgotten classes'
    components are gone and each forgotten class's weight goes to the override classes (split equally among them,
    within a class in proportion to its components' weights). Components keep their class labels."""
    forget = {int(c) for c in forget_classes}
    override = ([c for c in range(law.num_classes) if c not in forget] if override_classes is None
                else [int(c) for c in override_classes])
    class_weights = law.class_weights()
    extra = sum(float(class_weights[c]) for c in forget) / len(override)
    keep = torch.tensor([int(c) not in forget for c in law.component_classes])
    weights = law.weights.clone()
    for c in override:
        members = law.component_classes == c
        weights[members] += extra * law.weights[members] / law.weights[members].sum()
    weights = weights[keep]
    return GaussianMixture(weights / weights.sum(), law.means[keep], law.covariances[keep],
                           law.component_classes[keep], name=f"{law.name}-forget{sorted(forget)}")


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def forgetting_report(module, classifier, forget_classes: Sequence[int], num_samples: int = 1000,
                      num_classes: int = 10, nfe: int | None = 1, seed: int = 2024, batch_size: int = 250,
                      shape: Sequence[int] | None = None) -> dict:
    """Classify ``module.sample`` images (fixed noise from ``seed``; labels n % num_classes, so every class is
    requested equally often) and report, for each forgotten class c:
      ``fraction_of_all[c]``        -- fraction of ALL samples classified as c (a faithful generator: 1 / num_classes);
      ``fraction_of_requested[c]``  -- fraction of the samples requested AS c that are classified as c (faithful: ~1);
      ``requested_classified_as[c]`` -- the classifier's histogram over the samples requested as c (where they went);
    plus ``kept_accuracy`` (samples requested as a kept class classified as that class) and the protocol.
    ``classifier(images in [-1, 1]) -> logits`` (e.g. the shipped MNIST classifier)."""
    forget = [int(c) for c in forget_classes]
    if num_samples < num_classes:
        raise ValueError(f"num_samples must be >= num_classes ({num_classes}), got {num_samples}")
    shape = tuple(shape) if shape is not None else tuple(module.teacher.data_shape)
    device = getattr(module, "device", torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *shape), generator=generator)
    labels = torch.arange(num_samples) % num_classes
    was_training = classifier.training
    classifier.eval()
    predictions = []
    for start in range(0, num_samples, batch_size):
        part = noise[start:start + batch_size].to(device)
        images = module.sample(part, labels[start:start + batch_size].to(device), nfe)
        predictions.append(classifier(images.float().clamp(-1, 1)).argmax(1).cpu())
    classifier.train(was_training)
    predicted = torch.cat(predictions)
    kept = ~torch.isin(labels, torch.tensor(forget))
    report = {
        "fraction_of_all": {c: float((predicted == c).float().mean()) for c in forget},
        "fraction_of_requested": {c: float((predicted[labels == c] == c).float().mean()) for c in forget},
        "requested_classified_as": {
            c: {k: float((predicted[labels == c] == k).float().mean()) for k in range(num_classes)} for c in forget},
        "kept_accuracy": float((predicted[kept] == labels[kept]).float().mean()) if kept.any() else float("nan"),
        "protocol": {"num_samples": num_samples, "num_classes": num_classes, "nfe": nfe, "seed": seed,
                     "labels": "n % num_classes"},
    }
    report["fraction_of_all_total"] = sum(report["fraction_of_all"].values())
    return report


@torch.no_grad()
def kept_classes_fid(module, reference_images: Tensor, reference_labels: Tensor, forget_classes: Sequence[int],
                     num_samples: int = 1000, num_classes: int = 10, nfe: int | None = 1, seed: int = 1234,
                     extractor: str = "mnist-classifier", batch_size: int = 250, **metric_kwargs) -> dict:
    """FID (KID, precision/recall) of ``module.sample`` on the KEPT classes only -- labels cycle over the classes not
    in ``forget_classes``, fixed noise from ``seed`` -- against the first ``num_samples`` reference images whose label
    is kept (e.g. MNIST test images). The same call on a plain DMD2 / SiD student gives the row SFD is compared with.
    Extra keyword arguments go to ``lightning_modules.evaluation.image_metrics.image_metrics``."""
    from ..evaluation.image_metrics import image_metrics

    forget = torch.tensor([int(c) for c in forget_classes])
    kept = [c for c in range(num_classes) if c not in set(forget.tolist())]
    keep_reference = ~torch.isin(reference_labels.long(), forget)
    reference = reference_images[keep_reference][:num_samples]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *reference.shape[1:]), generator=generator)
    labels = torch.tensor(kept)[torch.arange(num_samples) % len(kept)]
    device = getattr(module, "device", torch.device("cpu"))
    samples = torch.cat([module.sample(noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device),
                                       nfe).float().cpu() for i in range(0, num_samples, batch_size)])
    key = f"kept-classes-without-{'-'.join(map(str, forget.tolist()))}-{len(reference)}"
    metrics = image_metrics(samples, key, reference, extractor=extractor, **metric_kwargs)
    metrics["protocol"].update(kept_classes=kept, seed=seed, nfe=nfe, labels="kept classes cycled")
    return metrics
