"""Image teachers and students by name from torchvision or timm, built from their constructors (no download).

``build_vision_model("timm:resnet18", num_classes=10, in_shape=(3, 32, 32))`` or ``"torchvision:resnet18"`` returns a
:class:`VisionModel`: the library's network behind kdistill's input standardisation, taking rows as kdistill's data
holds them (flat or (channels, height, width)). Pretrained weights are never fetched: kdistill does not reach the
network at run time, and a distilled student starts from scratch anyway.

Needs the optional extra ``pip install 'kdistill[vision]'`` (``torchvision==0.28.*``, which requires exactly torch
2.13.0, so pip never swaps the CPU torch for a CUDA build; and ``timm>=1.0``). The registry name prefixes ``timm:``
and ``torchvision:`` are wired into ``build_student`` by the student registry.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdistill.errors import DependencyError, StudentError
from kdistill.students.base import register_student_family
from kdistill.students.layers import Standardize

__all__ = ["PREFIXES", "VisionModel", "build_vision_model"]

PREFIXES = ("timm", "torchvision")
_NO_DOWNLOAD = ("pretrained", "weights", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
_SMALL_INPUT = 64  # images at most this tall and wide get a CIFAR-style stem (see build_vision_model)


class VisionModel(nn.Module):
    """``standardize -> reshape to in_shape -> net``: ``net`` is the torchvision / timm model, so its layers are named
    ``net.<path>`` for feature methods (``"net.layer2"`` for a ResNet's second stage).

    ``forward``: (batch, *in_shape) or (batch, prod(in_shape)) -> (batch, num_classes).
    """

    def __init__(self, net: nn.Module, in_shape: Sequence[int], name: str) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.name = name
        self.standardize = Standardize(self.in_shape)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x.reshape(x.shape[0], *self.in_shape)))


def _import(library: str) -> Any:
    try:
        return importlib.import_module(library)
    except Exception as error:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        raise DependencyError(
            f"student '{library}:...' needs {library}, which could not be imported ({type(error).__name__}: {error})",
            hint="pip install 'kdistill[vision]' (torchvision==0.28.*, built for torch 2.13.0, and timm>=1.0).",
        ) from error


def _split(name: str) -> tuple[str, str]:
    prefix, _, architecture = name.partition(":")
    if prefix not in PREFIXES or not architecture:
        raise StudentError(
            f"vision model names are 'timm:<architecture>' or 'torchvision:<architecture>', got {name!r}",
            hint="e.g. 'timm:resnet18' or 'torchvision:resnet18'.",
        )
    return prefix, architecture


def _unknown(name: str, known: Sequence[str]) -> StudentError:
    close = difflib.get_close_matches(name.partition(":")[2], known, n=3)
    suggestion = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return StudentError(f"unknown vision model {name!r}", hint=f"{suggestion}the library lists {len(known)} names.")


def _construct(
    prefix: str, architecture: str, name: str, num_classes: int, channels: int, params: dict[str, Any]
) -> nn.Module:
    if prefix == "timm":
        timm = _import("timm")
        if architecture not in timm.list_models():
            raise _unknown(name, timm.list_models())
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=channels, **params)
    models = _import("torchvision.models")
    known = models.list_models()
    if architecture not in known:
        raise _unknown(name, known)
    net = models.get_model(architecture, weights=None, num_classes=num_classes, **params)
    if channels != 3:
        _replace_first_conv(net, channels)
    return net


def _parent_and_attribute(net: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attribute = path.rpartition(".")
    return (net.get_submodule(parent_path) if parent_path else net), attribute


def _replace_first_conv(net: nn.Module, channels: int) -> None:
    """Rebuild the first 2-D convolution for ``channels`` inputs (torchvision's constructors assume 3)."""
    for path, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            replacement = nn.Conv2d(
                channels,
                module.out_channels,
                (module.kernel_size[0], module.kernel_size[1]),
                stride=(module.stride[0], module.stride[1]),
                padding=padding if isinstance(padding, str) else (padding[0], padding[1]),
                bias=module.bias is not None,
            )
            parent, attribute = _parent_and_attribute(net, path)
            setattr(parent, attribute, replacement)
            return
    raise StudentError("the vision model has no 2-D convolution to adapt to the input channels", hint="pick a CNN.")


def _small_input_stem(net: nn.Module, channels: int) -> bool:
    """The CIFAR ResNet stem: a 3x3 stride-1 first convolution and no max-pool, for a ResNet-style network with
    ``conv1`` and ``maxpool`` (torchvision's and timm's ResNets). Returns whether it applied."""
    conv1, maxpool = getattr(net, "conv1", None), getattr(net, "maxpool", None)
    if not isinstance(conv1, nn.Conv2d) or not isinstance(maxpool, nn.MaxPool2d):
        return False
    net.conv1 = nn.Conv2d(channels, conv1.out_channels, 3, stride=1, padding=1, bias=conv1.bias is not None)
    net.maxpool = nn.Identity()
    return True


def build_vision_model(
    name: str,
    num_classes: int,
    in_shape: Sequence[int],
    *,
    small_input: bool | None = None,
    **params: Any,
) -> VisionModel:
    """Build ``name`` (``"timm:<architecture>"`` or ``"torchvision:<architecture>"``) with random weights.

    Args:
        name: the library prefix and its architecture name (``timm.list_models()``,
            ``torchvision.models.list_models()``).
        num_classes: outputs of the classifier.
        in_shape: one row as an image, (channels, height, width) or (height, width) for one channel.
        small_input: give a ResNet-style network (``conv1`` + ``maxpool``) the CIFAR stem (3x3 stride-1 first
            convolution, no max-pool), so a 32x32 image keeps 32x32 maps in the first stage instead of 8x8. Default:
            on when the image is at most 64 pixels tall and wide.
        params: passed to the library's constructor, e.g. ``channels=(16, 32, 64, 128)`` for a narrow timm ResNet,
            ``width_per_group=...`` for torchvision's. Pretrained weights cannot be asked for.

    Raises:
        StudentError: an unknown prefix or architecture (with the closest names), a bad ``in_shape``, a request for
            pretrained weights, or a model whose output for ``in_shape`` is not (batch, num_classes).
        DependencyError: the library is not installed (or does not load with this torch).
    """
    prefix, architecture = _split(name)
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise StudentError(
            f"a vision model takes images of shape (channels, height, width) or (height, width), got {tuple(in_shape)}",
            hint="pass in_shape=(3, 32, 32) for CIFAR-style colour images, (1, 28, 28) for MNIST.",
        )
    asked = sorted(set(params) & set(_NO_DOWNLOAD))
    if asked:
        raise StudentError(
            f"build_vision_model builds untrained models only; got {asked}",
            hint="drop those arguments; load weights yourself (net.load_state_dict) if you have a local file.",
        )
    net = _construct(prefix, architecture, name, num_classes, shape[0], dict(params))
    small = max(shape[1:]) <= _SMALL_INPUT if small_input is None else small_input
    if small:
        _small_input_stem(net, shape[0])
    model = VisionModel(net, shape, name)
    _check_output(model, shape, num_classes, name)
    return model


def _check_output(model: VisionModel, shape: tuple[int, ...], num_classes: int, name: str) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        try:
            out = model(torch.zeros(2, math.prod(shape)))
        except RuntimeError as error:
            raise StudentError(
                f"{name} cannot take images of shape {shape}: {error}",
                hint="use a larger in_shape or small_input=True, or another architecture.",
            ) from error
    model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise StudentError(
            f"{name} returned {tuple(out.shape)} for 2 images of shape {shape}, not (2, {num_classes})",
            hint="pick a classification architecture (one whose constructor takes num_classes).",
        )


def _family(library: str) -> Any:
    def build(variant: str, in_shape: Sequence[int], num_classes: int, **params: Any) -> VisionModel:
        return build_vision_model(f"{library}:{variant}", num_classes, in_shape, **params)

    build.__name__ = f"build_{library}"
    return build


register_student_family(
    "timm", "a timm architecture by name (timm:resnet18), random weights, CIFAR stem for small images [vision]"
)(_family("timm"))
register_student_family(
    "torchvision", "a torchvision architecture by name (torchvision:resnet18), random weights [vision]"
)(_family("torchvision"))
