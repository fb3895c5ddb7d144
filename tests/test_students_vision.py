"""``kdistill.students.vision.build_vision_model``: names, shapes, the CIFAR stem, the errors.

The library-independent logic is checked against a stand-in ``timm`` module (a ResNet-like network with ``conv1`` and
``maxpool``, as timm's and torchvision's ResNets have); the real libraries are exercised when the ``vision`` extra is
installed and loads with this torch (the tests skip otherwise, saying why).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.errors import DependencyError, StudentError
from kdistill.students.vision import VisionModel, build_vision_model


class _TinyResNet(nn.Module):
    """The parts of a ResNet the builder touches: conv1 (7x7 stride 2), maxpool, a stage, a head."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(self.maxpool(self.conv1(x))).mean(dim=(2, 3)))


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    module = types.ModuleType("timm")

    def create_model(name: str, **kwargs: Any) -> nn.Module:
        calls.append({"name": name, **kwargs})
        kwargs.pop("pretrained")
        return _TinyResNet(**kwargs)

    module.list_models = lambda: ["resnet18", "resnet34", "efficientnet_b0"]  # type: ignore[attr-defined]
    module.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


def _feature_shape(model: nn.Module, path: str, x: torch.Tensor) -> tuple[int, ...]:
    seen: dict[str, torch.Size] = {}
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _i, out: seen.update(shape=out.shape))
    model.eval()(x)
    handle.remove()
    return tuple(seen["shape"])


def test_builds_untrained_with_the_cifar_stem_on_small_images(fake_timm: list[dict[str, Any]]) -> None:
    model = build_vision_model("timm:resnet18", 10, (3, 32, 32), width=8)
    assert fake_timm[-1] == {"name": "resnet18", "pretrained": False, "num_classes": 10, "in_chans": 3, "width": 8}
    assert isinstance(model, VisionModel)
    assert model.net.conv1.kernel_size == (3, 3)
    assert model.net.conv1.stride == (1, 1)
    assert isinstance(model.net.maxpool, nn.Identity)
    flat = torch.randn(4, 3 * 32 * 32)  # kdistill's data may hold images as flat rows
    assert _feature_shape(model, "net.layer1", flat) == (4, 8, 32, 32), "the first stage keeps the full resolution"
    assert model(flat).shape == (4, 10)


def test_large_images_keep_the_librarys_stem_and_small_input_forces_either_way(fake_timm: list) -> None:
    large = build_vision_model("timm:resnet18", 5, (3, 96, 96))
    assert large.net.conv1.stride == (2, 2)
    assert isinstance(large.net.maxpool, nn.MaxPool2d)
    assert _feature_shape(large, "net.layer1", torch.randn(2, 3, 96, 96)) == (2, 8, 24, 24)
    forced = build_vision_model("timm:resnet18", 5, (3, 32, 32), small_input=False)
    assert isinstance(forced.net.maxpool, nn.MaxPool2d)


def test_one_channel_images_given_as_height_width(fake_timm: list) -> None:
    model = build_vision_model("timm:resnet18", 3, (28, 28))
    assert model.in_shape == (1, 28, 28)
    assert fake_timm[-1]["in_chans"] == 1
    assert model.net.conv1.in_channels == 1
    assert model(torch.randn(2, 28 * 28)).shape == (2, 3)


def test_standardize_is_fitted_like_the_built_in_students(fake_timm: list) -> None:
    model = build_vision_model("timm:resnet18", 3, (1, 8, 8))
    rows = torch.randn(50, 64) * 5 + 3
    model.standardize.fit(rows)
    standardized = model.standardize(rows.reshape(50, 1, 8, 8))
    assert standardized.mean(dim=0).abs().max() < 1e-5
    assert standardized.std(dim=0, unbiased=False).sub(1).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("name", "shape", "params", "match"),
    [
        ("keras:resnet18", (3, 32, 32), {}, r"'timm:<architecture>' or 'torchvision:<architecture>'"),
        ("timm:", (3, 32, 32), {}, r"'timm:<architecture>'"),
        ("timm:resnet81", (3, 32, 32), {}, r"unknown vision model 'timm:resnet81'(.|\n)*did you mean 'resnet18'"),
        ("timm:resnet18", (0, 32, 32), {}, r"\(channels, height, width\)(.|\n)*got \(0, 32, 32\)"),
        ("timm:resnet18", (3, 32, 32, 1), {}, r"got \(3, 32, 32, 1\)"),
        ("timm:resnet18", (3, 32, 32), {"pretrained": True}, r"untrained models only; got \['pretrained'\]"),
    ],
)
def test_bad_names_shapes_and_pretrained_requests_are_clear_errors(
    fake_timm: list, name: str, shape: tuple[int, ...], params: dict[str, Any], match: str
) -> None:
    with pytest.raises(StudentError, match=match):
        build_vision_model(name, 10, shape, **params)


def test_a_model_whose_output_is_not_classes_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("timm")
    module.list_models = lambda: ["encoder"]  # type: ignore[attr-defined]
    module.create_model = lambda name, **kw: nn.Conv2d(kw["in_chans"], 4, 3)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", module)
    with pytest.raises(StudentError, match=r"returned \(2, 4, 30, 30\) for 2 images of shape \(3, 32, 32\)"):
        build_vision_model("timm:encoder", 10, (3, 32, 32))


def test_a_missing_or_broken_library_is_a_dependency_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(DependencyError, match=r"pip install 'kdistill\[vision\]'"):
        build_vision_model("timm:resnet18", 10, (3, 32, 32))


def test_the_vision_student_distills_through_distill(fake_timm: list) -> None:
    import kdistill

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1 * 12 * 12)).astype(np.float32)
    y = (x[:, :72].sum(axis=1) > 0).astype(np.int64)
    teacher = build_vision_model("timm:resnet18", 2, (1, 12, 12))
    student = build_vision_model("timm:resnet18", 2, (1, 12, 12), width=4)
    student.standardize.fit(torch.as_tensor(x))
    result = kdistill.distill(
        teacher,
        student,
        (x, y),
        method="fitnet",
        method_params={"student_layers": "net.layer1", "teacher_layers": "net.layer1"},
        epochs=1,
        batch_size=32,
        baseline=False,
        profile=False,
        verbose=False,
        report=False,
    )
    assert result.student is student
    assert result.history[-1]["train_hint"] > 0


def _real(library: str) -> Any:
    """The library, or a skip saying why (absent, or built for another torch: torchvision raises RuntimeError)."""
    try:
        return importlib.import_module(library)
    except Exception as error:
        pytest.skip(f"the vision extra is not usable here: import {library} failed ({type(error).__name__})")


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_real_resnet18_builds_without_download_and_classifies(library: str) -> None:
    _real(library)
    model = build_vision_model(f"{library}:resnet18", 10, (3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.net.maxpool, nn.Identity)
    assert _feature_shape(model, "net.layer1", torch.randn(2, 3, 32, 32)) == (2, 64, 32, 32)


def test_real_timm_narrow_resnet_for_small_students() -> None:
    _real("timm")
    model = build_vision_model("timm:resnet18", 10, (1, 32, 32), channels=(8, 16, 32, 64))
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert model(torch.randn(2, 1024)).shape == (2, 10)


def test_the_methods_page_vision_example_runs_as_written() -> None:
    import contextlib
    import io
    import re
    from pathlib import Path

    _real("timm")
    _real("torchvision")
    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    (block,) = re.findall(r"```py\n(.*?)```", page, flags=re.DOTALL)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "docs/methods.md", "exec"), {})
    assert printed.getvalue().strip() == "torch.Size([2, 10])"
