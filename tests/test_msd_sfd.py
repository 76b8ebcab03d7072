"""MSD (multi-student distillation) and SFD (score forgetting distillation) against exact math.

Gradients: the teacher is the exact class-conditional Gaussian-mixture denoiser; students are affine generators with a
known Gaussian law, the critic is that law's exact denoiser; the independent side uses Tweedie denoisers from
torch.distributions densities (tests/helpers.py) and writes each paper's formula out by hand.
Convergence: ring8 with every component a class, judged against the exact law (component assignment is ground truth).
"""
import json
import os
import types

import pytest
import torch
from torch import nn

from lightning_modules.diffusion import EDMSchedule, KarrasRampTime
from lightning_modules.evaluation.sample_metrics import ground_truth_metrics, mode_assignment
from lightning_modules.methods.msd import MSD, export_msd_students
from lightning_modules.methods.sfd import SFD, forgetting_report, forgetting_target_law
from lightning_modules.networks import Denoiser, GaussianMixture, GaussianMixtureTeacher, ToyMLPDenoiser
from lightning_modules.networks.routing import ConditionRoutedStudents, owner_table
from tests.helpers import AffineGenerator, fix_randomness, independent_x0
from tests.toy_runs import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 64
CLASSES = [[0, 1, 2, 3], [4, 5, 6, 7]]


def _class_law(law: GaussianMixture, label: int) -> GaussianMixture:
    """The law restricted to one class (its components, renormalised weights)."""
    members = law.component_classes == label
    weights = law.weights[members]
    return GaussianMixture(weights / weights.sum(), law.means[members], law.covariances[members])


def _independent_class_x0(law, x_t, alpha, sigma, labels, create_graph=False):
    """Per-sample Tweedie denoiser of the class-conditional law p(x0 | c_i), grouped by class."""
    out = torch.zeros_like(x_t, dtype=torch.float64)
    parts, rows = [], []
    for label in labels.unique().tolist():
        index = (labels == label).nonzero(as_tuple=True)[0]
        parts.append(independent_x0(_class_law(law, label), x_t[index], alpha[index], sigma[index], create_graph))
        rows.append(index)
    return out.index_copy(0, torch.cat(rows), torch.cat(parts))


def _owner_law(student: AffineGenerator, classes) -> GaussianMixture:
    """The student's Gaussian law, once per owned class (so conditioning on any of its classes gives that law)."""
    law = student.law()
    n = len(classes)
    return GaussianMixture(torch.full((n,), 1.0 / n), law.means.repeat(n, 1), law.covariances.repeat(n, 1, 1),
                           component_classes=classes)


def _two_affine_students():
    return [AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]]),
            AffineGenerator([-0.3, 0.25], [[0.3, -0.1], [0.05, 0.6]])]


# ============================================================================================== routing
class _Constant(Denoiser):
    """x0 = bias (a parameter); records the labels it was called with."""

    def __init__(self, value):
        super().__init__(EDMSchedule())
        self.bias = nn.Parameter(torch.full((2,), float(value), dtype=torch.float64))
        self.seen = []

    def predict(self, x_t, t, cond):
        self.seen.append(cond.clone())
        return x_t.double() * 0 + self.bias


def test_routing_sends_each_sample_to_exactly_its_owner_and_gradients_reach_only_the_owner():
    students = [_Constant(10.0), _Constant(20.0), _Constant(30.0)]
    router = ConditionRoutedStudents(students, [[0, 3], [1], [2, 4]])
    labels = torch.tensor([4, 0, 1, 3, 3, 2, 0, 1])
    x = torch.randn(8, 2, dtype=torch.float64)
    out = router(x, torch.ones(8, dtype=torch.float64), labels)
    expected_value = torch.tensor([30.0, 10.0, 20.0, 10.0, 10.0, 30.0, 10.0, 20.0], dtype=torch.float64)
    assert torch.equal(out, expected_value[:, None].expand(8, 2))
    for student, classes in zip(students, [[0, 3], [1], [2, 4]]):
        assert set(torch.cat(student.seen).tolist()) <= set(classes)
    # a loss on the samples of classes owned by student 0 only: the other students get no gradient at all
    router(x, torch.ones(8, dtype=torch.float64), torch.tensor([0, 3, 3, 0]))[:, 0].sum().backward()
    assert students[0].bias.grad.tolist() == [4.0, 0.0]
    assert students[1].bias.grad is None and students[2].bias.grad is None


@pytest.mark.parametrize("classes, num_classes, message", [
    ([[0, 1], [1, 2]], None, "class 1 is owned by students 0 and 1"),
    ([[0, 0], [1]], None, "class 0 is owned twice by student 0"),
    ([[0, 1], [3]], None, "class 2 is owned by no student"),
    ([[0, 1], [2]], 4, "class 3 is owned by no student"),
    ([[0, 1], []], None, "student 1 owns no classes"),
    ([[0, 5]], 4, "class 5 (student 0) is outside 0..3"),
    ([[0, -1]], None, "class -1 (student 0) is negative"),
])
def test_bad_partitions_fail_naming_the_class(classes, num_classes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        owner_table(classes, num_classes)


def test_router_rejects_labels_without_owner_and_too_small_embeddings():
    router = ConditionRoutedStudents([_Constant(1.0), _Constant(2.0)], CLASSES)
    x, t = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"label 8 \(the null label of classifier-free guidance\) has no owning"):
        router(x, t, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="needs class labels"):
        router(x, t, None)
    with pytest.raises(ValueError, match="student 1 owns class 7 but embeds only 4 classes"):
        ConditionRoutedStudents([ToyMLPDenoiser(2, 8, 1, num_classes=8), ToyMLPDenoiser(2, 8, 1, num_classes=4)],
                                CLASSES)
    with pytest.raises(ValueError, match="2 students but classes_per_student has 3 entries"):
        ConditionRoutedStudents([_Constant(1.0), _Constant(2.0)], [[0], [1], [2]])


# ============================================================================================== MSD gradient
def _msd_affine_setup(critic_kind):
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)   # class c = component c
    students = _two_affine_students()
    if critic_kind == "per-student":
        critic = ConditionRoutedStudents([GaussianMixtureTeacher(_owner_law(s, c), schedule)
                                          for s, c in zip(students, CLASSES)], CLASSES)
    else:  # one class-conditional critic: class c is the law of c's owner
        laws = [students[k].law() for k in owner_table(CLASSES)]
        critic = GaussianMixtureTeacher(GaussianMixture(torch.full((8,), 1 / 8), torch.cat([l.means for l in laws]),
                                                        torch.cat([l.covariances for l in laws]),
                                                        component_classes=list(range(8))), schedule)
    module = MSD(teacher=teacher, student=ConditionRoutedStudents(students, CLASSES), critic=critic)
    return module, teacher.law, students


@pytest.mark.parametrize("critic_kind", ["per-student", "shared"])
def test_msd_generator_gradient_is_each_students_own_dmd2_gradient(critic_kind):
    module, law, students = _msd_affine_setup(critic_kind)
    schedule = module.schedule
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(B, 2, dtype=torch.float64, generator=generator)
    labels = torch.multinomial(torch.tensor([4.0, 1, 1, 1, 1, 1, 0.5, 0.5]), B, replacement=True, generator=generator)
    t = KarrasRampTime(0.02, 0.98)(B, schedule, generator)
    eps = torch.randn(B, 2, dtype=torch.float64, generator=generator)
    fix_randomness(module, [t], [eps])
    module.generator_loss({"noise": noise, "cond": labels})["loss"].backward()

    # independent: each student alone, DMD2 Eq. 2 on its own sub-batch, mean over its own samples
    alpha, sigma = schedule.alpha_sigma(t)
    owners = torch.tensor(owner_table(CLASSES))[labels]
    counts = torch.bincount(owners, minlength=2)
    assert counts.min() > 5 and counts[0] != counts[1]  # both students train, on unequal sub-batches
    for k, student in enumerate(students):
        mine = (owners == k).nonzero(as_tuple=True)[0]
        z = noise[mine]
        with torch.no_grad():
            x_g = student.mean + z @ student.matrix.T
        x_t = alpha[mine, None] * x_g + sigma[mine, None] * eps[mine]
        real = _independent_class_x0(law, x_t, alpha[mine], sigma[mine], labels[mine])
        fake = independent_x0(student.law(), x_t, alpha[mine], sigma[mine])
        g = (fake - real) / (x_g - real).abs().mean(1, keepdim=True)
        dloss_dx = g / (len(mine) * 2)               # d/dx of mean_{own samples} mean_d 1/2 (x - sg(x - g))^2
        assert torch.allclose(student.mean.grad, dloss_dx.sum(0), rtol=1e-6, atol=1e-12)
        assert torch.allclose(student.matrix.grad, dloss_dx.T @ z, rtol=1e-6, atol=1e-12)
        assert dloss_dx.sum(0).norm() > 1e-3  # non-trivial: the students are far from their classes' laws


def test_msd_needs_a_router_and_a_matching_routed_critic():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    with pytest.raises(ValueError, match="MSD needs a ConditionRoutedStudents student"):
        MSD(teacher=teacher, student=ToyMLPDenoiser(2, 16, 2, num_classes=8))
    student = ConditionRoutedStudents([ToyMLPDenoiser(2, 16, 2, num_classes=8) for _ in range(2)], CLASSES)
    critic = ConditionRoutedStudents([ToyMLPDenoiser(2, 16, 2, num_classes=8) for _ in range(2)],
                                     [[0, 1, 2], [3, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match="routed critic's classes"):
        MSD(teacher=teacher, student=student, critic=critic)
    with pytest.raises(ValueError, match="covers 4 classes but the teacher has 8"):
        MSD(teacher=teacher, student=ConditionRoutedStudents([ToyMLPDenoiser(2, 16, 2, num_classes=4)],
                                                             [[0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="unknown pretraining_source 'data'"):
        MSD(teacher=teacher, student=student, pretraining_source="data")


def test_msd_with_one_shared_class_conditional_critic_warm_starts_it_and_trains():
    from lightning_modules.networks import DiscriminatorHead
    torch.manual_seed(0)
    teacher = GaussianMixtureTeacher("ring8", EDMSchedule())
    student = ConditionRoutedStudents([ToyMLPDenoiser(2, 16, 2, num_classes=8) for _ in range(2)], CLASSES)
    with pytest.raises(ValueError, match="a discriminator head needs one shared critic"):
        MSD(teacher=teacher, student=student, discriminator=DiscriminatorHead(16), gan_generator_weight=0.1)
    critic = ToyMLPDenoiser(2, 32, 2, num_classes=8)
    initial = [p.detach().clone() for p in critic.parameters()]
    module = MSD(teacher=teacher, student=student, critic=critic, warm_start_steps=20, warm_start_batch_size=32)
    module.setup("fit")
    assert all(not torch.equal(a, b) for a, b in zip(initial, critic.parameters()))   # regressed onto the teacher
    batch = {"noise": torch.randn(16, 2), "cond": torch.randint(0, 8, (16,))}
    module.critic_loss(batch)["loss"].backward()
    assert all(p.grad is not None for p in critic.parameters())
    module.generator_loss(batch)["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())


def test_teacher_score_matching_fits_each_student_on_its_own_classes_and_the_critic_copies_them():
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    torch.manual_seed(0)
    student = ConditionRoutedStudents([ToyMLPDenoiser(2, 64, 2, num_classes=8) for _ in range(2)], CLASSES)
    module = MSD(teacher=teacher, student=student, warm_start_steps=300, warm_start_batch_size=128)
    law = teacher.law
    x0, component = law.sample(512, torch.Generator().manual_seed(3))
    labels = law.component_classes[component]
    t = torch.full((512,), 1.0, dtype=torch.float64)
    x_t = schedule.add_noise(x0, torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)),
                             t).float()

    def error():
        with torch.no_grad():
            return (student(x_t, t, labels) - teacher(x_t, t, labels).float()).pow(2).mean().item()
    before = error()
    module.setup("fit")
    after = error()
    assert after * 20 < before, (before, after)
    assert module.pretraining_report["source"] == "law" and bool(module.warm_started)
    for name, value in module.critic.state_dict().items():  # per-student critics start from their students
        assert torch.equal(value, module.student.state_dict()[name])


def test_msd_converges_on_conditional_ring_with_two_students(tmp_path):
    """Two MLP students (classes 0-3 and 4-7): from TSM-initialised students (one-step samples collapse onto each
    class mean) to samples that match each class's Gaussian; ground truth: the exact law and its components."""
    cli = build("experiments/toy/ring8/msd.yaml", "--data.init_args.batches_per_epoch=1200",
                "--model.init_args.warm_start_steps=500", root=str(tmp_path))
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    law = datamodule.law
    module.setup("fit")

    def measure():
        generator = torch.Generator().manual_seed(11)
        noise = torch.randn(3000, 2, generator=generator)
        labels = torch.multinomial(law.class_weights(), 3000, replacement=True, generator=generator)
        x = module.sample(noise, labels, 1).double()
        metrics = ground_truth_metrics(x, law, generator=torch.Generator().manual_seed(12), num_floor_sets=1)
        metrics["class_accuracy"] = float((law.component_classes[mode_assignment(x, law)] == labels).float().mean())
        return metrics
    before = measure()
    trainer.fit(module, datamodule)
    after = measure()
    print(f"msd: sliced W2 {before['sliced_w2']:.4f} -> {after['sliced_w2']:.4f} (floor {after['sliced_w2_floor']:.4f})"
          f", per-mode KL {before['per_mode_kl']:.3f} -> {after['per_mode_kl']:.3f}, class accuracy "
          f"{after['class_accuracy']:.4f}")
    assert after["per_mode_kl"] * 4 < before["per_mode_kl"]
    # sliced W2 against 4 reference sets falls 1.2-1.45x (reference seeds 12-15); the 1.4x this once asserted held
    # only for one lucky reference set, SW2 at n = 3000 being dominated by mode-weight noise (see sample_metrics)
    assert after["sliced_w2"] * 1.15 < before["sliced_w2"]
    assert after["sliced_w2"] < 1.5 * after["sliced_w2_floor"]
    assert after["off_manifold"] * 3 < before["off_manifold"]  # 11% -> 2.6%
    assert after["class_accuracy"] > 0.99 and after["modes_covered"] == 8


def _tiny_unet(channels, num_classes=4):
    from lightning_modules.networks import DiffusersUNetDenoiser
    config = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=channels,
                  down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                  norm_num_groups=4, num_class_embeds=num_classes + 1, attention_head_dim=4)
    return DiffusersUNetDenoiser(config=config, preconditioning="edm")


def test_msd_students_export_as_diffusers_folders_that_sample_like_the_module(tmp_path):
    from lightning_modules.export import one_step_sample_from_export
    torch.manual_seed(0)
    teacher = _tiny_unet([8, 16])
    teacher.schedule = EDMSchedule()
    classes = [[0, 2], [1, 3]]
    module = MSD(teacher=teacher, student=ConditionRoutedStudents([_tiny_unet([4, 8]), _tiny_unet([4, 8])], classes))
    folder = export_msd_students(module, str(tmp_path / "students"), use_ema=False)
    with open(os.path.join(folder, "routing.json")) as handle:
        routing = json.load(handle)
    assert routing["class_to_student"] == [0, 1, 0, 1]
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    ours = module.sample(noise, labels, nfe=1)
    for entry in routing["students"]:
        mine = torch.isin(labels, torch.tensor(entry["classes"]))
        theirs = one_step_sample_from_export(os.path.join(folder, entry["folder"]), noise[mine], labels[mine])
        assert torch.allclose(theirs, ours[mine], atol=1e-5)


# ============================================================================================== SFD gradient
def _sfd_setup(**kwargs):
    torch.manual_seed(0)
    schedule = EDMSchedule()
    teacher = GaussianMixtureTeacher("ring8", schedule)
    student = AffineGenerator([0.1, -0.2], [[0.5, 0.1], [-0.2, 0.4]])
    student.num_classes = 8  # a class-agnostic generator with the same law for every class: known exactly
    critic = GaussianMixtureTeacher(_owner_law(student, list(range(8))), schedule)
    return SFD(teacher=teacher, student=student, critic=critic, **kwargs), teacher.law, student


@pytest.mark.parametrize("alpha_sid, forget_weight", [(1.2, 1.0), (1.0, 0.3)])
def test_sfd_generator_gradient_uses_the_override_class_score_for_forget_samples(alpha_sid, forget_weight):
    module, law, student = _sfd_setup(alpha=alpha_sid, forget_classes=[0, 5], override_classes=[1],
                                      forget_weight=forget_weight)
    schedule = module.schedule
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(B, 2, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 8, (B,), generator=generator)
    t = KarrasRampTime(0.2, 1.0)(B, schedule, generator)
    eps = torch.randn(B, 2, dtype=torch.float64, generator=generator)
    fix_randomness(module, [t], [eps])
    module.generator_loss({"noise": noise, "cond": labels})["loss"].backward()

    def independent_gradient(teacher_labels):
        m = student.mean.detach().clone().requires_grad_(True)
        A = student.matrix.detach().clone().requires_grad_(True)
        x_g = m + noise @ A.T
        alpha, sigma = schedule.alpha_sigma(t)
        x_t = alpha[:, None] * x_g + sigma[:, None] * eps
        y_real = _independent_class_x0(law, x_t, alpha, sigma, teacher_labels, create_graph=True)
        y_fake = independent_x0(student.law(), x_t, alpha, sigma, create_graph=True)
        w = (x_g - y_real).detach().abs().mean(1).clamp_min(1e-5)
        per_sample = ((y_real - y_fake) * ((y_real - x_g) - alpha_sid * (y_real - y_fake))).sum(1) / w
        weight = torch.where((labels == 0) | (labels == 5), forget_weight, 1.0).double()
        (weight * per_sample).mean().backward()
        return m.grad, A.grad

    forgotten = (labels == 0) | (labels == 5)
    assert 3 < forgotten.sum() < B - 3
    m_grad, A_grad = independent_gradient(torch.where(forgotten, 1, labels))   # target: class 1's exact denoiser
    assert torch.allclose(student.mean.grad, m_grad, rtol=1e-6, atol=1e-12)
    assert torch.allclose(student.matrix.grad, A_grad, rtol=1e-6, atol=1e-12)
    assert m_grad.norm() > 1e-3
    # the override matters: plain SiD (teacher at the requested class) gives a clearly different gradient
    m_plain, _ = independent_gradient(labels)
    assert (m_plain - m_grad).norm() > 0.05 * m_grad.norm()


def test_sfd_override_draws_and_critic_weights():
    module, _, _ = _sfd_setup(forget_classes=[0], override_classes=[2, 3], critic_forget_weight=0.25)
    cond = torch.tensor([0] * 400 + [4] * 4)
    drawn = module.teacher_labels(cond)
    assert set(drawn[:400].tolist()) == {2, 3} and drawn[400:].tolist() == [4] * 4
    assert 0.4 < (drawn[:400] == 2).float().mean() < 0.6
    assert module.forget_weights(cond, 0.25)[[0, 400]].tolist() == [0.25, 1.0]
    default, _, _ = _sfd_setup(forget_classes=[3])          # no override given: every kept class
    assert default.override_classes == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("kwargs, message", [
    (dict(forget_classes=[]), "forget_classes is empty"),
    (dict(forget_classes=[9]), "forget class 9 is outside 0..7"),
    (dict(forget_classes=[1, 1]), "forget_classes lists class 1 more than once"),
    (dict(forget_classes=[1], override_classes=[1]), "override class 1 is also a forget class"),
    (dict(forget_classes=[1], override_classes=[8]), "override class 8 is outside 0..7"),
    (dict(forget_classes=[1], forget_weight=0.0), "forget_weight must be > 0"),
    (dict(forget_classes=list(range(8))), "no override class"),
])
def test_sfd_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _sfd_setup(**kwargs)


def test_sfd_needs_labels_in_the_batch():
    module, _, _ = _sfd_setup(forget_classes=[0])
    with pytest.raises(ValueError, match="SFD needs class labels in the batch"):
        module.generator_loss({"noise": torch.randn(4, 2, dtype=torch.float64)})


def test_forgetting_target_law_moves_the_forgotten_weight_to_the_override_classes():
    law = GaussianMixtureTeacher("digits64").law
    target = forgetting_target_law(law, [3], [5, 7])
    weights, original = target.class_weights(), law.class_weights()
    assert weights[3] == 0 and abs(float(weights.sum()) - 1) < 1e-12
    assert torch.allclose(weights[5], original[5] + original[3] / 2)
    assert torch.allclose(weights[0], original[0])
    assert target.num_components == law.num_components - 3


def test_sfd_converges_on_conditional_ring_forgetting_class_0_into_class_1(tmp_path):
    """Samples requested for class 0 move from mode 0 to mode 1 (ground truth: the exact mixture's component
    assignment) while the other classes keep matching their own modes; the sample law approaches the exact law of a
    perfect forgetting student (forgetting_target_law)."""
    cli = build("experiments/toy/ring8/sfd.yaml", "--data.init_args.batches_per_epoch=600",
                "--model.init_args.warm_start_steps=500", root=str(tmp_path))
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    law = datamodule.law
    target = forgetting_target_law(law, [0], [1])
    module.setup("fit")

    def measure():
        generator = torch.Generator().manual_seed(21)
        noise = torch.randn(3000, 2, generator=generator)
        labels = torch.multinomial(law.class_weights(), 3000, replacement=True, generator=generator)
        x = module.sample(noise, labels, 1).double()
        metrics = ground_truth_metrics(x, target, generator=torch.Generator().manual_seed(22), num_floor_sets=1)
        landed = law.component_classes[mode_assignment(x, law)]
        forget = labels == 0
        metrics["forget_in_override"] = float((landed[forget] == 1).float().mean())
        metrics["forget_in_forget"] = float((landed[forget] == 0).float().mean())
        metrics["kept_accuracy"] = float((landed[~forget] == labels[~forget]).float().mean())
        return metrics
    before = measure()
    trainer.fit(module, datamodule)
    after = measure()
    print(f"sfd: class-0 samples in mode 1 {before['forget_in_override']:.3f} -> {after['forget_in_override']:.3f}, "
          f"kept accuracy {after['kept_accuracy']:.4f}, sliced W2 to the target law {before['sliced_w2']:.4f} -> "
          f"{after['sliced_w2']:.4f} (floor {after['sliced_w2_floor']:.4f}), per-mode KL {before['per_mode_kl']:.3f}"
          f" -> {after['per_mode_kl']:.3f}")
    assert before["forget_in_forget"] > 0.95                       # the teacher-initialised student still draws class 0
    assert after["forget_in_override"] > 0.97 and after["forget_in_forget"] < 0.01
    assert after["kept_accuracy"] > 0.99
    assert after["sliced_w2"] * 1.5 < before["sliced_w2"]
    assert after["per_mode_kl"] * 10 < before["per_mode_kl"]


# ============================================================================================== forgetting report
MNIST_CLASSIFIER = os.path.join(ROOT, "assets", "mnist-classifier", "mnist-classifier-v1.safetensors")


def _real_image_module(images, labels, replace: dict):
    """A stand-in module whose 'samples' are real MNIST images of the requested class (or of replace[class]); it
    records the labels it was asked for."""
    pools = {c: images[labels == c] for c in range(10)}
    used = {c: 0 for c in range(10)}
    requested = []

    def sample(noise, cond, nfe):
        requested.extend(cond.tolist())
        out = []
        for c in cond.tolist():
            source = replace.get(c, c)
            out.append(pools[source][used[source] % len(pools[source])])
            used[source] += 1
        return torch.stack(out)
    return types.SimpleNamespace(sample=sample, device=torch.device("cpu"), requested=requested,
                                 teacher=types.SimpleNamespace(data_shape=(1, 28, 28)))


@pytest.mark.skipif(not os.path.isfile(MNIST_CLASSIFIER), reason="the shipped MNIST classifier is missing")
def test_forgetting_report_with_the_shipped_classifier_on_real_mnist():
    from datamodules.images import MNISTDataModule
    from lightning_modules.evaluation.feature_extractors import load_mnist_classifier
    classifier = load_mnist_classifier(MNIST_CLASSIFIER)
    images, labels = MNISTDataModule().split("test")
    faithful = forgetting_report(_real_image_module(images, labels, {}), classifier, [0], num_samples=1000)
    assert 0.09 < faithful["fraction_of_all"][0] < 0.11
    assert faithful["fraction_of_requested"][0] > 0.97 and faithful["kept_accuracy"] > 0.97
    forgotten = forgetting_report(_real_image_module(images, labels, {0: 1}), classifier, [0], num_samples=1000)
    assert forgotten["fraction_of_all"][0] < 0.02 and forgotten["fraction_of_all_total"] < 0.02
    assert forgotten["requested_classified_as"][0][1] > 0.97
    assert forgotten["kept_accuracy"] > 0.97


@pytest.mark.skipif(not os.path.isfile(MNIST_CLASSIFIER), reason="the shipped MNIST classifier is missing")
def test_kept_classes_fid_samples_and_scores_only_the_kept_classes(tmp_path):
    from datamodules.images import MNISTDataModule
    from lightning_modules.methods.sfd import kept_classes_fid
    datamodule = MNISTDataModule()
    test_images, test_labels = datamodule.split("test")
    train_images, train_labels = datamodule.split("train")
    kwargs = dict(num_samples=500, kid=False, prc=False, cache_dir=str(tmp_path), weights_path=MNIST_CLASSIFIER)
    real = _real_image_module(train_images, train_labels, {})
    same_law = kept_classes_fid(real, test_images, test_labels, [0, 7], **kwargs)
    assert set(real.requested) == {1, 2, 3, 4, 5, 6, 8, 9}
    assert same_law["protocol"]["kept_classes"] == [1, 2, 3, 4, 5, 6, 8, 9]
    shifted = kept_classes_fid(_real_image_module(train_images, train_labels, {1: 0, 2: 7}), test_images, test_labels,
                               [0, 7], **kwargs)   # a generator that draws forgotten digits for two kept labels
    assert same_law["fid"] * 5 < shifted["fid"]


# ============================================================================================== MNIST smoke
TEACHER = os.path.join(ROOT, "assets", "mnist-teacher", "unet")


@pytest.mark.skipif(not os.path.isdir(TEACHER), reason="the shipped MNIST teacher is missing")
@pytest.mark.parametrize("method", ["msd", "sfd"])
def test_mnist_config_runs_a_few_steps(method, tmp_path):
    overrides = ["--trainer.max_steps=4", "--trainer.callbacks=[]", "--data.init_args.batch_size=8"]
    if method == "msd":
        overrides += ["--model.init_args.warm_start_steps=2", "--model.init_args.warm_start_batch_size=8"]
    cli = build(f"experiments/mnist/{method}.yaml", *overrides, root=str(tmp_path))
    module = cli.model
    if method == "msd":
        teacher_size = sum(p.numel() for p in module.teacher.parameters())
        sizes = [sum(p.numel() for p in s.parameters()) for s in module.student.students]
        assert len(sizes) == 4 and max(sizes) * 3 < teacher_size
    cli.trainer.fit(module, cli.datamodule)
    if method == "msd":
        assert module.pretraining_report["source"] == "real" and module.pretraining_report["steps"] == 2
    samples = module.sample(torch.randn(10, 1, 28, 28), torch.arange(10), nfe=1)
    assert samples.shape == (10, 1, 28, 28) and torch.isfinite(samples).all()
