"""Structured pruning: neurons and channels really removed (smaller model, same interface), rebuildable from its
spec, and KD fine-tuning from the teacher's logits wins accuracy back."""

from __future__ import annotations

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from kdistill.api import save_student
from kdistill.compress import prune_and_finetune, prune_structured
from kdistill.compress.prune import output_layer, pruned_spec
from kdistill.datasets import load_digits
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.errors import ExportError
from kdistill.evaluate import accuracy
from kdistill.losses import get_loss
from kdistill.students import CNN, MLP, build_student
from kdistill.teachers import as_teacher, teacher_logits

pytest.importorskip("torch_pruning")


@pytest.fixture(autouse=True)
def _leave_the_global_rng_as_found():
    """These tests draw random tensors; the global generator is restored after each so no other test's draws change."""
    with torch.random.fork_rng(devices=[]):
        yield


def test_mlp_neurons_are_removed_and_the_output_layer_kept():
    torch.manual_seed(0)
    model = MLP((64,), 10, hidden=(128, 64)).eval()
    before = [p.clone() for p in model.parameters()]
    pruned = prune_structured(model, torch.randn(8, 64), ratio=0.5)
    linears = [m for m in pruned.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 32), (32, 10)]
    # hand count: 64*64+64 + 64*32+32 + 32*10+10
    assert sum(p.numel() for p in pruned.parameters()) == 4160 + 2080 + 330
    assert pruned(torch.randn(5, 64)).shape == (5, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # original untouched
    assert output_layer(model) is model.layers[-1]


def test_kept_neurons_are_the_largest_by_l2_norm():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=(8,)).eval()
    with torch.no_grad():
        first = model.layers[0]
        norms = torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 0.3, 2.0, 0.4])
        first.weight.copy_(torch.ones(8, 6) * norms[:, None] / 6**0.5)
        first.bias.zero_()
        model.layers[2].weight.copy_(torch.ones(3, 8) * 1e-3)  # the next layer's columns barely count
    pruned = prune_structured(model, torch.randn(4, 6), ratio=0.5)
    kept = pruned.layers[0].weight.norm(dim=1)
    torch.testing.assert_close(kept.sort().values, torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_cnn_channels_and_batchnorm_shrink_together_and_spec_rebuilds(tmp_path):
    import kdistill

    torch.manual_seed(0)
    model, spec = build_student("cnn", torch.randn(32, 40), 10, channels=(16, 16, 16))
    model.eval()
    pruned = prune_structured(model, torch.randn(8, 40), ratio=0.5)
    convs = [m for m in pruned.features if isinstance(m, torch.nn.Conv1d)]
    norms = [m for m in pruned.features if isinstance(m, torch.nn.BatchNorm1d)]
    assert [c.out_channels for c in convs] == [8, 8, 8]
    assert [n.num_features for n in norms] == [8, 8, 8]
    assert pruned.head.in_features == 8
    new_spec = pruned_spec(spec, pruned)
    assert new_spec is not None
    assert new_spec["channels"] == [8, 8, 8]
    save_student(pruned, tmp_path / "student.safetensors", spec=new_spec, classes=None)
    restored = kdistill.load(tmp_path)
    x = torch.randn(6, 40)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), pruned(x))


def test_ratio_out_of_range_is_explained():
    with pytest.raises(ExportError, match=r"pruning ratio must be in \[0, 1\), got 1.0"):
        prune_structured(CNN((16,), 2), torch.randn(4, 16), ratio=1.0)


def test_kd_finetuning_recovers_accuracy_after_heavy_pruning():
    data = load_digits(0)
    x_train, y_train = (torch.as_tensor(a) for a in data.train)
    x_val, y_val = (torch.as_tensor(a) for a in data.val)
    teacher = as_teacher(LogisticRegression(max_iter=300).fit(*data.train))
    targets = teacher_logits(teacher, x_train)
    model, spec = build_student("mlp", x_train, 10, hidden=(64, 32))
    config = TrainConfig(epochs=25, lr=3e-3, verbose=False)
    fit(model, get_loss("kd"), TransferSet(x_train, y_train, targets), config=config)
    trained = accuracy(model(x_val).detach(), y_val)

    result = prune_and_finetune(model, x_train, y_train, targets, ratio=0.75, spec=spec, val=(x_val, y_val), epochs=0)
    cut = accuracy(result.model(x_val).detach(), y_val)
    tuned = prune_and_finetune(
        model, x_train, y_train, targets, ratio=0.75, spec=spec, val=(x_val, y_val), epochs=20, lr=3e-3
    )
    recovered = accuracy(tuned.model(x_val).detach(), y_val)
    assert tuned.parameters_after < 0.3 * tuned.parameters_before
    assert tuned.spec is not None
    assert tuned.spec["hidden"] == [16, 8]
    assert len(tuned.history) >= 1
    assert "train_kd" in tuned.history[0]
    assert cut < trained - 0.05  # pruning 75% of the neurons hurts...
    assert recovered > cut + 0.05  # ...and fine-tuning from the teacher wins it back
