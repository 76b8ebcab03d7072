"""Several denoisers behind one Denoiser, each owning a subset of the class labels (the students of MSD).

``ConditionRoutedStudents(students, classes_per_student)`` holds the students in an ``nn.ModuleList`` and a
class -> student table; its forward sends every sample to the student that owns the sample's class and puts the
outputs back in batch order. Everything that speaks the Denoiser contract keeps working unchanged on it: the
DistillationModule's training sample and evaluation sampler, the StudentEMA average (a deep copy of the whole router),
checkpoints (the students' weights are ordinary submodule parameters) and a critic made by copying the student (a
router of per-student critics with the same table).

Routing keys. ``routing_key: label`` (the default) routes by the class label, or for prompts by the prompt's class /
concept id (``TextCondition.labels``, e.g. the digit a caption names, from the prompt datamodule's ``label_parser`` or
``label_column``): the text analogue of MSD's class partition, and the one to use whenever the prompt set has concept
ids. ``routing_key: embedding_hash`` needs no labels: the key of a prompt is a random-hyperplane (SimHash, Charikar,
STOC 2002) code of its embedding -- ``hash_bits`` signs of fixed Gaussian projections (seed ``hash_seed``) of the
prompt's pooled embedding, or where there is none the mask-weighted mean of its token embeddings -- so the keys are
0..2**hash_bits-1 and ``classes_per_student`` partitions those. It is deterministic (computed in float64 on the CPU
from a fixed seed, so every rank and every run agrees), depends only on the prompt, and sends prompts with similar
embeddings to the same bucket (the collision probability of two prompts is 1 - angle / pi per bit), i.e. a coarse
semantic partition of the prompt space as MSD wants (each student specialises on a region of the condition space).
Buckets are not balanced; a learned partition (k-means of the prompt set's embeddings) would be, and is not
implemented here. Rows of a TextCondition go to their student with ``select_conditions``.

Conditions are class labels (or labelled / hashed prompts, above). A partition is checked when the router is built: every class in 0..num_classes-1 is
owned by exactly one student and every student owns at least one class, else a ValueError names the class or student.
A label without an owner (e.g. the null label of classifier-free guidance, or ``cond=None``) is an error at call
time: a routed student has no unconditional mode.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..diffusion.schedules import NoiseSchedule
from ..conditioning.condition import TextCondition, condition_labels, select_conditions
from .denoiser import Denoiser

ROUTING_KEYS = ("label", "embedding_hash")


def prompt_vectors(cond: TextCondition) -> Tensor:
    """One vector per prompt (float64, CPU): the pooled embedding, else the mask-weighted mean of the token states."""
    if cond.pooled is not None:
        return cond.pooled.detach().to("cpu", torch.float64).flatten(1)
    embeds = cond.embeds.detach().to("cpu", torch.float64)
    if cond.mask is None:
        return embeds.mean(1)
    mask = cond.mask.detach().to("cpu", torch.float64).unsqueeze(-1)
    return (embeds * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def owner_table(classes_per_student: Sequence[Sequence[int]], num_classes: int | None = None) -> list[int]:
    """The class -> student list of a partition, after checking it is one (errors name the class or student)."""
    if len(classes_per_student) == 0:
        raise ValueError("classes_per_student is empty: a router needs at least one student")
    owners: dict[int, int] = {}
    for student, classes in enumerate(classes_per_student):
        if len(classes) == 0:
            raise ValueError(f"student {student} owns no classes (classes_per_student[{student}] is empty)")
        for label in classes:
            label = int(label)
            if label < 0:
                raise ValueError(f"class {label} (student {student}) is negative; class labels are 0..num_classes-1")
            if num_classes is not None and label >= num_classes:
                raise ValueError(f"class {label} (student {student}) is outside 0..{num_classes - 1} "
                                 f"(num_classes={num_classes})")
            if label in owners:
                first = owners[label]
                where = f"twice by student {student}" if first == student else f"by students {first} and {student}"
                raise ValueError(f"class {label} is owned {where}; each class must have exactly one owner")
            owners[label] = student
    total = num_classes if num_classes is not None else max(owners) + 1
    missing = [label for label in range(total) if label not in owners]
    if missing:
        raise ValueError(f"class {missing[0]} is owned by no student (unowned classes: {missing}); "
                         "classes_per_student must cover every class 0..num_classes-1")
    return [owners[label] for label in range(total)]


class ConditionRoutedStudents(Denoiser):
    """``students[k]`` answers for the classes ``classes_per_student[k]``.

    The students may be any Denoisers with the same data shape (e.g. UNets smaller than the teacher); a
    class-conditional student receives the original labels, so its label embedding must cover the classes it owns.
    A student that ignores its condition and owns several classes generates one law for all of them."""

    def __init__(self, students: Sequence[Denoiser], classes_per_student: Sequence[Sequence[int]],
                 num_classes: int | None = None, schedule: NoiseSchedule | None = None,
                 routing_key: str = "label", hash_bits: int = 0, hash_seed: int = 0):
        super().__init__(None, prediction_type="x0")
        if routing_key not in ROUTING_KEYS:
            raise ValueError(f"unknown routing_key {routing_key!r}; expected one of {ROUTING_KEYS}")
        if routing_key == "embedding_hash":
            if not 1 <= hash_bits <= 16:
                raise ValueError(f"routing_key 'embedding_hash' needs 1 <= hash_bits <= 16, got {hash_bits}")
            if num_classes is not None and num_classes != 2 ** hash_bits:
                raise ValueError(f"embedding_hash keys are 0..{2 ** hash_bits - 1} (hash_bits={hash_bits}); "
                                 f"num_classes {num_classes} differs")
            num_classes = 2 ** hash_bits
        elif hash_bits:
            raise ValueError("hash_bits is for routing_key 'embedding_hash'")
        self.routing_key, self.hash_bits, self.hash_seed = routing_key, int(hash_bits), int(hash_seed)
        self._projections: dict[int, Tensor] = {}
        if len(students) != len(classes_per_student):
            raise ValueError(f"{len(students)} students but classes_per_student has {len(classes_per_student)} "
                             "entries; give one list of classes per student")
        self.owners = owner_table(classes_per_student, num_classes)
        self.classes_per_student = [sorted(int(c) for c in classes) for classes in classes_per_student]
        self.num_classes = len(self.owners)
        for index, (student, classes) in enumerate(zip(students, self.classes_per_student)):
            embedded = getattr(student, "num_classes", 0) or 0
            if embedded and max(classes) >= embedded:
                raise ValueError(f"student {index} owns class {max(classes)} but embeds only {embedded} classes "
                                 f"(its num_classes); give it num_classes >= {max(classes) + 1}")
        shapes = {tuple(s.data_shape) for s in students if s.data_shape is not None}
        if len(shapes) > 1:
            raise ValueError(f"the students' data shapes differ: {sorted(shapes)}")
        self.students = nn.ModuleList(students)
        self.text_conditioned = any(getattr(s, "text_conditioned", False) for s in students)
        self.schedule = schedule  # now that the students exist, the setter shares it with them

    # ------------------------------------------------------------------ one schedule for the router and its students
    @property
    def schedule(self) -> NoiseSchedule | None:
        return self.__dict__.get("_schedule")

    @schedule.setter
    def schedule(self, value: NoiseSchedule | None) -> None:
        """Setting the router's schedule (as DistillationModule does with the teacher's) gives it to every student that
        has none; a student with a different schedule is an error."""
        self.__dict__["_schedule"] = value
        students = self.__dict__.get("_modules", {}).get("students")
        if value is None or students is None:
            return
        for index, student in enumerate(students):
            if student.schedule is None:
                student.schedule = value
            elif student.schedule is not value and student.schedule.describe() != value.describe():
                raise ValueError(f"student {index} schedule {student.schedule.describe()} differs from the router's "
                                 f"{value.describe()}; omit it to share the teacher's")

    # ------------------------------------------------------------------ routing
    def routing_keys(self, cond) -> Tensor:
        """The routing key of each condition, (B,) long: its class / concept id, or its prompt's SimHash code."""
        if self.routing_key == "label":
            # prompts route by their concept id (TextCondition.labels), class labels by themselves
            return condition_labels(cond, "ConditionRoutedStudents").long().reshape(-1)
        if not isinstance(cond, TextCondition):
            raise ValueError(f"routing_key 'embedding_hash' routes prompts (a TextCondition), got "
                             f"{type(cond).__name__}; class labels route with routing_key 'label'")
        vectors = prompt_vectors(cond)
        width = vectors.shape[1]
        if width not in self._projections:
            generator = torch.Generator().manual_seed(self.hash_seed)
            self._projections[width] = torch.randn((width, self.hash_bits), generator=generator, dtype=torch.float64)
        bits = (vectors @ self._projections[width] > 0).long()
        keys = (bits * (2 ** torch.arange(self.hash_bits))).sum(1)
        return keys.to(cond.device)

    def owners_of(self, cond: Tensor | None) -> Tensor:
        """The owning student of each label, (B,) long; labels without an owner are an error naming them."""
        if cond is None:
            raise ValueError("ConditionRoutedStudents needs class labels (cond) to route each sample to its student; "
                             "got cond=None (a routed student has no unconditional mode)")
        labels = self.routing_keys(cond)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            label = int(labels[bad][0])
            extra = " (the null label of classifier-free guidance)" if label == self.num_classes else ""
            raise ValueError(f"label {label}{extra} has no owning student; routed classes are "
                             f"0..{self.num_classes - 1}")
        return torch.as_tensor(self.owners, device=labels.device)[labels]

    def student_for_class(self, label: int) -> Denoiser:
        return self.students[self.owners[int(label)]]

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, prediction: str = "x0") -> Tensor:
        owners = self.owners_of(cond)
        t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
        outputs, positions = [], []
        for index, student in enumerate(self.students):
            mine = (owners == index).nonzero(as_tuple=True)[0]
            if mine.numel() == 0:
                continue  # a student with no sample in this batch is not called (and gets no gradient)
            outputs.append(student(x_t[mine], t[mine], select_conditions(cond, mine), prediction=prediction))
            positions.append(mine)
        gathered, positions = torch.cat(outputs), torch.cat(positions)
        # out-of-place scatter back to batch order: differentiable, each row written by exactly one student
        return torch.zeros_like(gathered).index_copy(0, positions, gathered)

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return self.forward(x_t, t, cond, prediction="x0")

    @property
    def data_shape(self):
        shapes = [s.data_shape for s in self.students if s.data_shape is not None]
        return tuple(shapes[0]) if shapes else None

    def extra_repr(self) -> str:
        key = "" if self.routing_key == "label" else f", routing_key=embedding_hash, hash_bits={self.hash_bits}"
        return f"classes_per_student={self.classes_per_student}{key}"
