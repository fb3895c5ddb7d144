"""Contract tests over every registered method (parametrized over ``kdistill.losses.LOSSES``, so a newly registered
method is checked automatically).

Each method is built with its defaults and fed fabricated outputs: random logits, and for every feature it declares,
a (batch, channels, length) map (student and teacher maps differ in channels and length, so projectors and resizing
are exercised), or (batch, members, classes) logits for ``"members"``. Class attributes steer the checks:
``at_equal`` (``"zero"``, the default: every term vanishes when the student equals the teacher; ``"none"`` opts out,
as do methods that need no teacher) and ``batch_order_invariant`` (default True). A new method is thus held to the
strict contract unless it says why not. A method that reads the teacher's top-k instead of its dense logits
(``kd_topk``) converts them with ``encode_teacher_topk`` into ``Outputs.topk``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kdistill.errors import KdistillError, MethodError, ShapeMismatchError
from kdistill.losses import (
    LOSSES,
    BaseLoss,
    StaticTargets,
    as_loss,
    compose_methods,
    defines_hook,
    get_loss,
    register_loss,
)
from kdistill.teachers import Outputs

BATCH, CLASSES, MEMBERS = 8, 5, 3


def _fabricate(
    loss: object, *, equal: bool, seed: int = 0
) -> tuple[Outputs, Outputs, torch.Tensor, list[torch.Tensor]]:
    """Student outputs (leaves requiring grad), teacher outputs, labels, and the student leaves."""
    generator = torch.Generator().manual_seed(seed)
    student_names = list(getattr(loss, "student_features", ()))
    teacher_names = list(getattr(loss, "teacher_features", ()))
    # token-level methods (TinyBERT's) compare (batch, seq, width) features of one batch, with its attention mask
    sequence = bool(getattr(loss, "sequence_features", False))
    student_shape, teacher_shape = ((BATCH, 6, 24), (BATCH, 6, 36)) if sequence else ((BATCH, 6, 4), (BATCH, 10, 8))
    logits = torch.randn(BATCH, CLASSES, generator=generator).requires_grad_()
    student_features = {
        name: torch.randn(student_shape, generator=generator).requires_grad_() for name in student_names
    }
    teacher_features: dict[str, torch.Tensor] = {}
    for position, name in enumerate(teacher_names):
        if sequence and name == "attention_mask":
            lengths = torch.randint(1, 7, (BATCH, 1), generator=generator)
            teacher_features[name] = (torch.arange(6)[None, :] < lengths).long()
        elif name == "members":
            if equal:
                teacher_features[name] = logits.detach()[:, None, :].repeat(1, MEMBERS, 1)
            else:
                teacher_features[name] = 2 * torch.randn(BATCH, MEMBERS, CLASSES, generator=generator)
        elif equal and position < len(student_names):
            teacher_features[name] = student_features[student_names[position]].detach().clone()
        else:
            teacher_features[name] = torch.randn(teacher_shape, generator=generator)
    teacher_logits = logits.detach().clone() if equal else 2 * torch.randn(BATCH, CLASSES, generator=generator)
    encode = getattr(loss, "encode_teacher_topk", None)  # methods that read the teacher's top-k instead
    if encode is not None:
        teacher = Outputs(features=teacher_features, index=torch.arange(BATCH), topk=encode(teacher_logits))
    else:
        teacher = Outputs(teacher_logits, teacher_features, index=torch.arange(BATCH))
    target = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    student = Outputs(logits, student_features)
    prepare = getattr(loss, "prepare", None)
    if prepare is not None:
        prepare(student, teacher, BATCH)
    return student, teacher, target, [logits, *student_features.values()]


def _permute(outputs: Outputs, order: torch.Tensor) -> Outputs:  # rows of every tensor, in the same order
    return outputs.replace(
        logits=outputs.logits[order] if outputs.has_logits else None,
        features={k: v[order] for k, v in outputs.features.items()},
        index=None if outputs.index is None else outputs.index[order],
        topk=None if outputs.topk is None else outputs.topk.index_select(order),
    )


def check_finite_and_differentiable(name: str) -> None:
    loss = get_loss(name)
    torch.manual_seed(0)
    student, teacher, target, leaves = _fabricate(loss, equal=False)
    terms = loss(student, teacher, target)
    assert "loss" in terms, f"{name} must return a 'loss' term"
    for term, value in terms.items():
        assert value.ndim == 0, f"{name}: term {term} is not a scalar"
        assert torch.isfinite(value), f"{name}: term {term} = {value}"
    terms["loss"].backward()
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    assert grads, f"{name}: no gradient reaches the student"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), f"{name}: the gradient wrt the student is zero everywhere"


def check_zero_at_equal(name: str) -> None:
    loss = get_loss(name)
    if not loss.needs_teacher or getattr(loss, "at_equal", "zero") != "zero":
        pytest.skip(f"{name} has no zero at student == teacher (needs_teacher={loss.needs_teacher})")
    student, teacher, _, leaves = _fabricate(loss, equal=True)
    terms = loss(student, teacher, None)
    for term, value in terms.items():
        assert abs(value.item()) < 1e-4, f"{name}: term {term} = {value.item()} at student == teacher"
    terms["loss"].backward()
    for leaf in leaves:
        if leaf.grad is not None:
            assert float(leaf.grad.abs().max()) < 1e-3, f"{name}: student == teacher is not a stationary point"


def check_batch_order_invariant(name: str) -> None:
    loss = get_loss(name)
    if not getattr(loss, "batch_order_invariant", True):
        pytest.skip(f"{name} declares batch_order_invariant = False (it keeps per-row state or samples)")
    student, teacher, target, _ = _fabricate(loss, equal=False)
    before = loss(student, teacher, target)
    order = torch.randperm(BATCH, generator=torch.Generator().manual_seed(1))
    after = loss(_permute(student, order), _permute(teacher, order), target[order])
    assert set(before) == set(after)
    for term in before:
        torch.testing.assert_close(after[term], before[term], rtol=1e-5, atol=1e-6)


NAMES = sorted(LOSSES)


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_described_and_builds_with_defaults(name: str) -> None:
    info = LOSSES[name]
    assert info.description.strip(), f"{name} has no description"
    loss = get_loss(name)
    assert isinstance(loss.needs_teacher, bool)
    assert all(isinstance(f, str) and f for f in loss.student_features)
    assert all(isinstance(f, str) and f for f in loss.teacher_features)


@pytest.mark.parametrize("name", NAMES)
def test_finite_and_differentiable_wrt_student(name: str) -> None:
    check_finite_and_differentiable(name)


@pytest.mark.parametrize("name", NAMES)
def test_zero_and_stationary_when_student_equals_teacher(name: str) -> None:
    check_zero_at_equal(name)


@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_batch_order(name: str) -> None:
    check_batch_order_invariant(name)


@pytest.mark.parametrize("name", NAMES)
def test_missing_teacher_is_a_clear_error(name: str) -> None:
    loss = get_loss(name)
    student, _, target, _ = _fabricate(loss, equal=False)
    if loss.needs_teacher:
        with pytest.raises(KdistillError, match="teacher"):
            loss(student, None, target)
    else:
        assert torch.isfinite(loss(student, None, target)["loss"])


@pytest.fixture
def registered_toys() -> Iterator[None]:
    """Two methods registered for one test: a correct one, and one that silently ignores all but the first row."""

    class SquaredLogitGap:
        needs_teacher = True
        student_features = ()
        teacher_features = ()
        at_equal = "zero"
        batch_order_invariant = True

        def __call__(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None) -> dict:
            assert teacher is not None
            gap = (student.logits - teacher.logits).pow(2).sum(1).mean()
            return {"loss": gap, "gap": gap}

    class FirstRowOnly(SquaredLogitGap):
        def __call__(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None) -> dict:
            assert teacher is not None
            gap = (student.logits[0] - teacher.logits[0]).pow(2).sum()
            return {"loss": gap, "gap": gap}

    register_loss("toy_gap", "test-only: squared logit gap")(SquaredLogitGap)
    register_loss("toy_first_row", "test-only: a buggy loss that reads one row")(FirstRowOnly)
    try:
        yield
    finally:
        del LOSSES["toy_gap"], LOSSES["toy_first_row"]


@pytest.mark.usefixtures("registered_toys")
def test_contract_checks_pick_up_new_methods_and_catch_a_buggy_one() -> None:
    assert {"toy_gap", "toy_first_row"} <= set(LOSSES)
    check_finite_and_differentiable("toy_gap")
    check_zero_at_equal("toy_gap")
    check_batch_order_invariant("toy_gap")
    with pytest.raises(AssertionError):
        check_batch_order_invariant("toy_first_row")


# ---- shapes: token-level outputs and the methods that do not support them ------------------------------------------

TOKEN_METHODS = {"kd", "kd_topk", "ce"}  # reduce over the last axis under a mask


@pytest.mark.parametrize("name", sorted(set(NAMES) - TOKEN_METHODS))
def test_sequence_outputs_are_a_clear_error_for_row_methods(name: str) -> None:
    """(batch, seq, vocab) logits, or a sequence mask, must never give a silently different number."""
    loss = get_loss(name)
    logits = torch.randn(BATCH, 4, CLASSES)
    student = Outputs(logits, {f: torch.randn(BATCH, 4, 6) for f in loss.student_features})
    teacher = Outputs(logits.clone(), {f: torch.randn(BATCH, 4, 6) for f in loss.teacher_features}, torch.arange(BATCH))
    target = torch.randint(0, CLASSES, (BATCH, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(8, 4, 5\)") as raised:
        loss(student, teacher, target)
    assert raised.value.hint
    masked = Outputs(torch.randn(BATCH, CLASSES), mask=torch.ones(BATCH, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError):
        loss(masked, Outputs(torch.randn(BATCH, CLASSES), index=torch.arange(BATCH)), target[:, 0])


@pytest.mark.parametrize("name", sorted(TOKEN_METHODS))
def test_token_methods_run_per_token_under_a_mask(name: str) -> None:
    loss = get_loss(name)
    logits = torch.randn(BATCH, 4, CLASSES, requires_grad=True)
    mask = torch.arange(4)[None, :] < torch.randint(1, 5, (BATCH, 1))
    teacher_logits = 2 * torch.randn(BATCH, 4, CLASSES)
    encode = getattr(loss, "encode_teacher_topk", None)
    teacher = Outputs(topk=encode(teacher_logits)) if encode else Outputs(teacher_logits)
    terms = loss(Outputs(logits, mask=mask), teacher, torch.randint(0, CLASSES, (BATCH, 4)))
    assert all(value.ndim == 0 and torch.isfinite(value) for value in terms.values())
    terms["loss"].backward()
    assert logits.grad is not None and float(logits.grad[~mask].abs().max()) == 0.0


# ---- the base class and its hooks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_method_has_the_base_class_hooks(name: str) -> None:
    loss = get_loss(name)
    assert isinstance(loss, BaseLoss)
    for hook in ("prepare", "start_epoch", "precompute"):
        assert callable(getattr(loss, hook))


def test_duck_typed_losses_are_wrapped_with_every_hook() -> None:
    calls: list[str] = []

    class Duck:  # no base class, only start_epoch among the hooks
        needs_teacher = False
        student_features = ("a",)
        teacher_features = ()
        at_equal = "none"

        def start_epoch(self, epoch: int, total_epochs: int) -> None:
            calls.append(f"epoch {epoch}/{total_epochs}")

        def __call__(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None) -> dict:
            return {"loss": student.logits.sum()}

    class DuckModule(torch.nn.Module):
        needs_teacher = True
        student_features = ()
        teacher_features = ()

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, student: Outputs, teacher: Outputs | None, target: torch.Tensor | None) -> dict:
            return {"loss": self.scale * student.logits.sum()}

    duck = as_loss(Duck())
    assert isinstance(duck, BaseLoss) and as_loss(duck) is duck
    assert (duck.needs_teacher, tuple(duck.student_features), duck.at_equal) == (False, ("a",), "none")
    duck.start_epoch(2, 5)
    duck.prepare(Outputs(torch.zeros(1, 1)), None, 1)  # absent: a no-op
    assert duck.precompute(torch.zeros(3, 2), None) is None
    assert calls == ["epoch 2/5"]
    assert defines_hook(duck, "start_epoch") and not defines_hook(duck, "prepare")
    assert float(duck(Outputs(torch.ones(2, 2)), None, None)["loss"]) == 4.0
    module = as_loss(DuckModule())
    assert isinstance(module, torch.nn.Module) and len(list(module.parameters())) == 1
    assert float(module(Outputs(torch.ones(2, 2)), None, None)["loss"].detach()) == 4.0
    with pytest.raises(MethodError, match="callable"):
        as_loss(object())  # type: ignore[arg-type]


def test_defines_hook_tells_real_hooks_from_the_defaults() -> None:
    assert defines_hook(get_loss("kd"), "precompute")
    assert not defines_hook(get_loss("kd"), "prepare")
    assert defines_hook(get_loss("fitnet"), "prepare")
    assert defines_hook(get_loss("dkd"), "start_epoch")
    with pytest.raises(ValueError, match="unknown loss hook"):
        defines_hook(get_loss("kd"), "warmup")


def test_compose_forwards_precompute_and_each_component_reads_its_own_columns() -> None:
    """kd packs its targets inside a composition too: the table is split back per component, and the composed
    value equals the sum of the components' textbook values."""
    torch.manual_seed(0)
    teacher_logits, y = torch.randn(30, CLASSES) * 2, torch.randint(0, CLASSES, (30,))
    composed = compose_methods(["kd", "dkd"])
    static = StaticTargets.build(composed, teacher_logits, y)
    assert static.packed
    index = torch.tensor([4, 9, 2, 29])
    served = static.select(index)
    student = torch.randn(4, CLASSES)
    got = composed(Outputs(student), served, y[index])
    expected = get_loss("kd")(Outputs(student), Outputs(teacher_logits[index]), y[index])
    expected_dkd = get_loss("dkd", ce_weight=0.0)(Outputs(student), Outputs(teacher_logits[index]), y[index])
    torch.testing.assert_close(got["kd/kd"], expected["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["loss"], expected["loss"] + expected_dkd["loss"], rtol=1e-5, atol=1e-6)
