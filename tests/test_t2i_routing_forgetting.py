"""The prompt-only mechanisms of MSD, SFD and DisBack on the shipped text-to-image MNIST latent teacher
(experiments/mnist_t2i/{msd,sfd,disback}.yaml), checked with real numbers:

* MSD routes every prompt to the student of its key (the caption's digit; or, without labels, the SimHash code of its
  embedding) and each student's gradient comes from its own prompts only;
* SFD's teacher target for a forgotten prompt is the teacher's prediction at the override prompt (the caption
  re-captioned, or an explicit prompt map), and every other prompt's target is unchanged;
* DisBack's stage 1 records the degradation path on prompts drawn from the prompt datamodule.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from lightning_modules.conditioning.condition import TextCondition, select_conditions
from lightning_modules.methods.disback import MANIFEST, verify_degradation_path
from lightning_modules.networks.routing import ConditionRoutedStudents
from tests.test_t2i_configs import ASSETS, ROOT, _overrides
from tests.toy_runs import build

CONFIGS = os.path.join(ROOT, "experiments", "mnist_t2i")


def _build(name, tmp_path, *extra):
    torch.manual_seed(0)
    cli = build(os.path.join(CONFIGS, f"{name}.yaml"), *_overrides(tmp_path), *extra)
    module, datamodule = cli.model, cli.datamodule
    datamodule.setup("fit")
    module.setup("fit")
    if hasattr(module, "attach_prompts"):
        module.attach_prompts(datamodule)
    return module, datamodule


def _batch(datamodule, prompts, seed=0):
    labels = torch.tensor([datamodule.label_fn(p) for p in prompts])
    noise = torch.randn((len(prompts), *datamodule.shape), generator=torch.Generator().manual_seed(seed))
    return {"noise": noise, "cond": datamodule.conditions(prompts, labels), "prompts": list(prompts)}


def _grads(module, batch, parameters, seed=0):
    torch.manual_seed(seed)
    loss = module.generator_loss(batch)["loss"]
    return [None if g is None else g.clone() for g in torch.autograd.grad(loss, parameters, allow_unused=True)]


# ---------------------------------------------------------------------------------------------------- MSD
@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return _build("msd", tmp_path_factory.mktemp("msd"))


def test_msd_routes_each_prompt_to_the_student_of_its_digit(msd):
    module, datamodule = msd
    router = module.student
    assert isinstance(router, ConditionRoutedStudents) and router.routing_key == "label"
    batch = _batch(datamodule, datamodule.prompts)  # all 90 captions
    digits = batch["cond"].labels
    assert sorted(set(digits.tolist())) == list(range(10))
    owners = router.owners_of(batch["cond"])
    assert torch.equal(owners, (digits >= 5).long())  # classes_per_student [[0..4], [5..9]]
    # the router's output rows are exactly each student's own output on its rows (select_conditions of the prompts)
    x = torch.randn(len(owners), *datamodule.shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((len(owners),), 625.0, dtype=torch.float64)
    with torch.no_grad():
        routed = router(x, t, batch["cond"])
        for k, student in enumerate(router.students):
            rows = (owners == k).nonzero(as_tuple=True)[0]
            own = student(x[rows], t[rows], select_conditions(batch["cond"], rows))
            torch.testing.assert_close(routed[rows], own, rtol=0, atol=0)


def test_msd_each_student_gets_gradient_only_from_its_prompts(msd):
    module, datamodule = msd
    module.train()
    students = module.student.students
    low = [p for p in datamodule.prompts if datamodule.label_fn(p) < 5][:3]
    high = [p for p in datamodule.prompts if datamodule.label_fn(p) >= 5][:3]
    params = [list(s.parameters()) for s in students]
    flat = params[0] + params[1]
    # a batch of student 0's prompts only: student 1 gets no gradient at all
    grads = _grads(module, _batch(datamodule, low), flat)
    g0, g1 = grads[:len(params[0])], grads[len(params[0]):]
    assert sum(float(g.norm()) for g in g0 if g is not None) > 0
    assert all(g is None or float(g.abs().max()) == 0 for g in g1)
    # a mixed batch: changing student 1's rows (their noise) leaves student 0's gradient unchanged, and vice versa
    mixed = _batch(datamodule, low + high, seed=2)
    other = dict(mixed, noise=mixed["noise"].clone())
    other["noise"][3:] = torch.randn(other["noise"][3:].shape, generator=torch.Generator().manual_seed(9))
    first, second = _grads(module, mixed, flat, seed=5), _grads(module, other, flat, seed=5)
    n0 = len(params[0])
    for a, b in zip(first[:n0], second[:n0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(first[n0:], second[n0:]) if a is not None)
    assert sum(float(g.norm()) for g in first[n0:] if g is not None) > 0


def test_msd_embedding_hash_routes_prompts_without_labels(msd):
    module, datamodule = msd
    students = list(module.student.students)
    router = ConditionRoutedStudents(students, [[0], [1]], routing_key="embedding_hash", hash_bits=1)
    cond = datamodule.conditions(datamodule.prompts)  # no labels
    assert cond.labels is None
    keys = router.routing_keys(cond)
    assert set(keys.tolist()) == {0, 1}  # both students own prompts of the shipped caption set
    # deterministic and a function of the prompt alone: a permuted batch permutes the keys
    order = torch.randperm(len(cond), generator=torch.Generator().manual_seed(3))
    assert torch.equal(router.routing_keys(select_conditions(cond, order)), keys[order])
    again = ConditionRoutedStudents(students, [[0], [1]], routing_key="embedding_hash", hash_bits=1)
    assert torch.equal(again.owners_of(cond), keys)
    with pytest.raises(ValueError, match="hash_bits"):
        ConditionRoutedStudents(students, [[0], [1]], routing_key="embedding_hash")
    with pytest.raises(ValueError, match="TextCondition"):
        router.owners_of(torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------- SFD
def _recording_teacher(module):
    calls = []
    original = module.teacher_x0

    def recorded(x_t, t, cond, guidance_scale=None):
        out = original(x_t, t, cond, guidance_scale)
        calls.append((x_t.detach().clone(), t.detach().clone(), cond, out.detach().clone()))
        return out
    module.teacher_x0 = recorded
    return calls, original


def _check_override(module, batch, overrides, datamodule):
    """The generator loss's teacher target: at the override prompt for the rows in ``overrides``, else unchanged."""
    calls, original = _recording_teacher(module)
    try:
        torch.manual_seed(0)
        module.generator_loss(batch)
    finally:
        del module.teacher_x0
    (x_t, t, cond, target), = calls
    own = original(x_t, t, batch["cond"]).detach()
    override_prompts = [overrides.get(p, p) for p in batch["prompts"]]
    at_override = original(x_t, t, datamodule.conditions(override_prompts)).detach()
    forgotten = torch.tensor([p in overrides for p in batch["prompts"]])
    assert forgotten.any() and (~forgotten).any()
    torch.testing.assert_close(target[forgotten], at_override[forgotten], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target[~forgotten], own[~forgotten], rtol=0, atol=0)
    assert float((own[forgotten] - target[forgotten]).abs().max()) > 1e-3  # the substitution changes the target
    # the unconditional branch of guidance stays the sample's own
    assert torch.equal(cond.null_embeds, batch["cond"].null_embeds)


def test_sfd_forget_digit_takes_the_teachers_score_at_the_recaptioned_prompt(tmp_path):
    module, datamodule = _build("sfd", tmp_path)
    module.train()
    zeros = [p for p in datamodule.prompts if datamodule.label_fn(p) == 0][:3]
    others = [p for p in datamodule.prompts if datamodule.label_fn(p) in (2, 7)][:3]
    batch = _batch(datamodule, zeros + others)
    assert module.forgotten(batch).tolist() == [True] * 3 + [False] * 3
    recaptioned = {p: p.replace("zero", "one") for p in zeros}
    assert [module.override_prompt(p) for p in zeros] == list(recaptioned.values())
    assert all(q in datamodule.prompts and datamodule.label_fn(q) == 1 for q in recaptioned.values())
    # the teacher condition's rows: the re-captioned prompts' encodings (and concept id 1), others untouched
    teacher_cond = module.teacher_conditions(batch)
    expected = datamodule.conditions(list(recaptioned.values()))
    assert torch.equal(teacher_cond.embeds[:3], expected.embeds)
    assert torch.equal(teacher_cond.embeds[3:], batch["cond"].embeds[3:])
    assert teacher_cond.labels.tolist() == [1, 1, 1] + batch["cond"].labels[3:].tolist()
    _check_override(module, batch, recaptioned, datamodule)
    # the forget weights reach the critic too: a batch with no forgotten prompt has weights 1
    assert module.forget_weights(batch["cond"], 0.5, module.forgotten(batch)).tolist() == [0.5] * 3 + [1.0] * 3

    # explicit prompt lists: forget one caption of a seven, overridden by a caption of a four
    seven = next(p for p in datamodule.prompts if datamodule.label_fn(p) == 7)
    four = next(p for p in datamodule.prompts if datamodule.label_fn(p) == 4)
    module.forget_classes, module.forget_prompts = [], [seven]
    module.recaption, module._recaption_pattern, module.override_prompts = {}, None, {seven: four}
    batch = _batch(datamodule, [seven, others[0], seven, others[1]])
    assert module.forgotten(batch).tolist() == [True, False, True, False]
    _check_override(module, batch, {seven: four}, datamodule)


# ---------------------------------------------------------------------------------------------------- DisBack
def test_disback_records_its_degradation_path_on_prompts(tmp_path):
    module, datamodule = _build("disback", tmp_path)
    module.path_steps, module.path_checkpoints, module.path_batch_size = 3, 3, 4
    module.path_dir = str(tmp_path / "paths")
    seen = []
    original = module.generator_training_sample

    def spy(batch):
        seen.append(batch["cond"])
        return original(batch)
    module.generator_training_sample = spy
    try:
        manifest = module.prepare_path()
    finally:
        del module.generator_training_sample
    assert len(seen) == 3 and all(isinstance(c, TextCondition) and len(c) == 4 for c in seen)
    known = datamodule.conditions(datamodule.prompts, torch.tensor(datamodule.labels)).embeds
    for cond in seen:  # every stage-1 condition is one of the prompt set's encodings, with its digit
        match = (cond.embeds[:, None] == known[None]).flatten(2).all(2)
        assert match.any(1).all()
        assert torch.equal(cond.labels, torch.tensor(datamodule.labels)[match.float().argmax(1)])
    directory = module.active_path_dir
    with open(os.path.join(directory, MANIFEST)) as handle:
        on_disk = json.load(handle)
    assert [n["index"] for n in on_disk["nodes"]] == [0, 1, 2, 3]
    assert [n["step"] for n in on_disk["nodes"]] == [0, 1, 2, 3]
    assert on_disk["settings"]["conditions"] == "prompts" and on_disk["settings"]["num_prompts"] == 90
    assert on_disk["nodes"] == manifest["nodes"]
    assert len(verify_degradation_path(module.path_network, directory)["nodes"]) == 4
    # the recording moved away from the teacher, and stage 2 starts on the last node
    last = module.path_network.state_dict()
    assert any(not torch.equal(last[k], v) for k, v in module.teacher.state_dict().items())
    assert int(module.path_index) == 3
    module.train()
    losses = module.generator_loss(_batch(datamodule, datamodule.prompts[:4]))
    assert torch.isfinite(losses["loss"]) and float(losses["path_index"]) == 3
