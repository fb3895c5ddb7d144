"""Transformer students, the DistilBERT way: a Hugging Face model of the teacher's own class with fewer layers,
initialised from the teacher's embeddings, chosen layers, final norm and head; or a fresh small transformer from a
config. Registered as the ``"transformer"`` student [hf].

Sanh, Debut, Chaumond & Wolf, "DistilBERT, a distilled version of BERT", 2019, https://arxiv.org/abs/1910.01108
(a 6-layer student initialised from BERT's layers 0, 2, 4, 7, 9, 11, which :func:`layer_map` reproduces).

The student is a plain transformers model: ``student(**batch).logits`` is (batch, classes), and
``save_pretrained(folder)`` writes what ``AutoModelForSequenceClassification.from_pretrained(folder)`` loads back.

>>> layer_map(12, 6)
[0, 2, 4, 7, 9, 11]
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill._deps import require
from kdistill.errors import StudentError
from kdistill.students.base import register_student

__all__ = [
    "FreshWeightsWarning",
    "fresh_transformer",
    "from_folder",
    "from_teacher",
    "layer_list",
    "layer_map",
    "load_classifier",
    "prune_feed_forward",
    "student_from_teacher_factory",
    "transformer",
]


class FreshWeightsWarning(UserWarning):
    """A student asked for with a narrower ``hidden_size`` than its teacher's: nothing can be copied, so it starts
    from random weights."""


# ---------------------------------------------------------------------------------------------------- the layer map


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    r"""The teacher layers (0-based) a student of ``student_layers`` layers is initialised from: evenly spaced, the
    first and the last kept, :math:`m_i = \lfloor i\,(T-1)/(S-1) + \tfrac12 \rfloor` for :math:`i = 0..S-1`
    (halves round up). One student layer takes teacher layer 0.

    It reproduces DistilBERT's 12 -> 6 map ``[0, 2, 4, 7, 9, 11]``; 6 -> 3 gives ``[0, 3, 5]``, 6 -> 2 ``[0, 5]``.
    More student layers than the teacher has, or fewer than one, is a :class:`StudentError`.
    """
    _check_count("teacher_layers", teacher_layers)
    _check_count("student_layers", student_layers)
    if student_layers > teacher_layers:
        raise StudentError(
            f"a student of {student_layers} layers cannot be built from a teacher of {teacher_layers}",
            hint=f"ask for at most {teacher_layers} layers (layers={teacher_layers} copies the teacher).",
        )
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [math.floor(index * step + 0.5) for index in range(student_layers)]


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudentError(f"{name} must be a positive integer, got {value!r}", hint=f"pass {name}=2, say.")


def _check_map(chosen: Sequence[int], teacher_layers: int) -> list[int]:
    """``chosen`` as a list of ints, or a :class:`StudentError`: empty, longer than the teacher, out of range, or
    not strictly increasing."""
    values = list(chosen)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise StudentError(
            f"layer_map must be a non-empty list of teacher layer numbers, got {chosen!r}",
            hint=f"pass 0-based teacher layers, e.g. {layer_map(teacher_layers, min(2, teacher_layers))}.",
        )
    if len(values) > teacher_layers:
        raise StudentError(
            f"layer_map {values} asks for {len(values)} layers but the teacher has {teacher_layers}",
            hint=f"pick at most {teacher_layers} of the teacher's layers 0..{teacher_layers - 1}.",
        )
    outside = [v for v in values if not 0 <= v < teacher_layers]
    if outside:
        raise StudentError(
            f"layer_map {values} names teacher layer {outside[0]}, out of range: the teacher has layers "
            f"0..{teacher_layers - 1}",
            hint="layer numbers are 0-based; the last layer is teacher_layers - 1.",
        )
    if any(later <= earlier for earlier, later in itertools.pairwise(values)):
        raise StudentError(
            f"layer_map {values} is not strictly increasing",
            hint="list each chosen teacher layer once, bottom to top (a student keeps the teacher's layer order).",
        )
    return values


# ---------------------------------------------------------------------------------------------------- the model


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and module of ``model``'s stack of transformer layers: the ``nn.ModuleList`` with the config's
    ``num_hidden_layers`` entries (BERT ``bert.encoder.layer``, GPT-2 ``transformer.h``, Llama ``model.layers``,
    DistilBERT ``distilbert.transformer.layer``). A model with none, or with several such lists, is a
    :class:`StudentError`."""
    count = _layer_count(model)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and name
    ]
    if len(found) > 1:  # prefer the usual names over, say, a list of per-layer adapters of the same length
        usual = [item for item in found if re.search(r"(^|\.)(layer|layers|h|block|blocks)$", item[0])]
        found = usual or found
    if len(found) != 1:
        raise StudentError(
            f"{type(model).__name__}: cannot tell its stack of {count} transformer layers (found "
            f"{[name for name, _ in found] or 'no ModuleList of that length'})",
            hint="transformer students support BERT-family, GPT-2 and Llama-family models.",
        )
    return found[0]


def _layer_count(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise StudentError(
            f"{type(model).__name__} is not a transformers model with a config.num_hidden_layers",
            hint="pass a transformers model (BertForSequenceClassification, GPT2Model, LlamaForCausalLM, ...).",
        )
    return count


def _student_config(config: Any, chosen: list[int]) -> Any:
    """A copy of the teacher's ``config`` with ``len(chosen)`` layers (per-layer lists such as ``layer_types``
    follow the map)."""
    teacher_layers = int(config.num_hidden_layers)
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(chosen)  # GPT-2's n_layer and DistilBERT's n_layers through attribute_map
    for name, value in list(vars(config).items()):
        if name == "layer_types" and isinstance(value, list) and len(value) == teacher_layers:
            setattr(config, name, [value[index] for index in chosen])
    return config


def _source_key(key: str, prefix: str, chosen: list[int]) -> str:
    """The teacher's state-dict key for the student's ``key``: layer ``j`` of the stack at ``prefix`` is teacher
    layer ``chosen[j]``; every other key (embeddings, final norm, pooler, head) is the same."""
    head = f"{prefix}."
    if not key.startswith(head):
        return key
    index, _, rest = key[len(head) :].partition(".")
    return f"{head}{chosen[int(index)]}.{rest}"


def from_teacher(
    model: nn.Module,
    *,
    layers: int | None = None,
    layer_map: Sequence[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """A student of the teacher's own class, from a copy of its config with fewer layers.

    ``model``: a transformers model (BERT-family encoders with or without a head, GPT-2, Llama-family).
    ``layers``: how many layers the student keeps, chosen by the default :func:`layer_map` (evenly spaced, first and
    last kept); or ``layer_map``: the teacher layers to keep, 0-based and increasing (``layers``, if given too, must
    be its length). Neither: every layer (a copy of the teacher).

    The embeddings, the chosen layers, the final norm, the pooler and the head are copied from the teacher exactly;
    the student is in the teacher's train/eval mode and on its device, with its dtype.

    ``hidden_size`` narrower than the teacher's: no weight can be copied, so the student is a *fresh* model of the
    teacher's class and config at that width (attention heads: the largest count up to the teacher's that divides
    it; feed-forward width scaled by the same ratio, or ``intermediate_size``), and a :class:`FreshWeightsWarning`
    says so.

    ``intermediate_size`` narrower than the teacher's feed-forward width (at the teacher's ``hidden_size``): each
    chosen layer keeps the ``intermediate_size`` feed-forward units that matter most by weight magnitude, their
    rows of the input projection(s) and columns of the output projection copied (:func:`prune_feed_forward`); the
    rest of the model is copied as above. Fewer units make every layer cheaper, so a student can be faster than its
    layer count alone allows (the embeddings, the pooler and the call cost the same in any student).
    """
    teacher_layers = _layer_count(model)
    if layer_map is not None:
        chosen = _check_map(layer_map, teacher_layers)
        if layers is not None and layers != len(chosen):
            raise StudentError(
                f"layers={layers} disagrees with layer_map {chosen} ({len(chosen)} layers)",
                hint="pass one of them: layer_map alone sets the number of layers.",
            )
    else:
        chosen = _default_map(teacher_layers, layers)
    config = _student_config(model.config, chosen)
    reference = next(iter(model.parameters()), None)
    width = int(getattr(model.config, "hidden_size", 0))
    if hidden_size is not None and hidden_size != width:
        student = _fresh_of_width(type(model), config, width, hidden_size, intermediate_size)
    else:
        if intermediate_size is not None:
            _set_inner(config, intermediate_size, _inner_size(model.config, width))
        student = type(model)(config)
        prefix, _ = layer_list(student)
        source = model.state_dict()
        copied = {key: source[_source_key(key, prefix, chosen)] for key in student.state_dict()}
        if intermediate_size is not None:
            copied = prune_feed_forward(copied, student.state_dict(), prefix)
        with torch.no_grad():
            student.load_state_dict(copied, strict=True)
    if reference is not None:
        student.to(device=reference.device, dtype=reference.dtype)
    student.train(model.training)
    return student


def _default_map(teacher_layers: int, layers: int | None) -> list[int]:
    return list(range(teacher_layers)) if layers is None else layer_map(teacher_layers, layers)


def _fresh_of_width(
    model_class: type[nn.Module], config: Any, width: int, hidden_size: int, intermediate_size: int | None = None
) -> nn.Module:
    _check_count("hidden_size", hidden_size)
    if hidden_size > width:
        raise StudentError(
            f"hidden_size={hidden_size} is wider than the teacher's {width}",
            hint="a student is at most as wide as its teacher; leave hidden_size out to copy the teacher's layers.",
        )
    heads = int(getattr(config, "num_attention_heads", 1))
    heads = max(count for count in range(1, heads + 1) if hidden_size % count == 0)
    overrides: dict[str, Any] = {"hidden_size": hidden_size, "num_attention_heads": heads}
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(kv_heads, int):
        overrides["num_key_value_heads"] = max(
            count for count in range(1, min(kv_heads, heads) + 1) if heads % count == 0
        )
    if isinstance(getattr(config, "head_dim", None), int):
        overrides["head_dim"] = hidden_size // heads
    inner = _inner_size(config, width)
    for name, value in overrides.items():
        setattr(config, name, value)
    if intermediate_size is not None or inner is not None:  # a family without a known field keeps its default
        _set_inner(config, intermediate_size or max(1, round((inner or 0) * hidden_size / width)), inner)
    warnings.warn(
        f"hidden_size={hidden_size} is narrower than the teacher's {width}: the student is a fresh "
        f"{model_class.__name__} of that width (random weights, {heads} heads), nothing is copied from the teacher",
        FreshWeightsWarning,
        stacklevel=3,
    )
    return model_class(config)


_INNER_FIELDS = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim")
"""Where a transformers config keeps its feed-forward width: BERT and Llama ``intermediate_size``, GPT-2
``n_inner`` (None: 4 × ``n_embd``), DistilBERT ``hidden_dim``, OPT ``ffn_dim``."""


def _inner_field(config: Any) -> str | None:
    """The name of ``config``'s feed-forward width field (None when it has none of :data:`_INNER_FIELDS`)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    for name in _INNER_FIELDS:
        if name in fields and (isinstance(fields[name], int) or (name == "n_inner" and fields[name] is None)):
            return name
    return None


def _inner_size(config: Any, width: int) -> int | None:
    """The feed-forward width of ``config`` (GPT-2's ``n_inner=None`` is 4 × the width); None when unknown."""
    name = _inner_field(config)
    if name is None:
        return None
    value = getattr(config, name)
    return 4 * width if value is None else int(value)


def _set_inner(config: Any, intermediate_size: int, teacher_inner: int | None) -> None:
    _check_count("intermediate_size", intermediate_size)
    name = _inner_field(config)
    if name is None or teacher_inner is None:
        raise StudentError(
            f"{type(config).__name__} has no feed-forward width this student can set ({', '.join(_INNER_FIELDS)})",
            hint="leave intermediate_size out for this model family.",
        )
    if intermediate_size > teacher_inner:
        raise StudentError(
            f"intermediate_size={intermediate_size} is wider than the teacher's feed-forward width {teacher_inner}",
            hint=f"use intermediate_size <= {teacher_inner}, or leave it out to keep every unit.",
        )
    setattr(config, name, intermediate_size)


def prune_feed_forward(
    teacher_tensors: Mapping[str, torch.Tensor], student_tensors: Mapping[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """``teacher_tensors`` (the student's keys, the teacher's values) cut to the student's narrower feed-forward
    layers. A tensor whose shape differs from the student's differs along the feed-forward units: one dimension
    where the teacher has U units and the student u < U. Per layer (keys under ``{prefix}.{j}.``), unit ``i``'s
    importance is the product over the layer's 2-D feed-forward weights of the L2 norm of its slice (the row of an
    input projection, the column of the output projection: how strongly the unit can read its input and write its
    output); the u most important units are kept, in their original order, in every tensor of that layer (weights
    and biases). Weight magnitude, not activations: it needs no data, and the student is then trained anyway.
    Returns the tensors with the kept units."""
    out = dict(teacher_tensors)
    head = f"{prefix}."
    by_layer: dict[str, list[tuple[str, int]]] = {}
    for key, value in teacher_tensors.items():
        target = tuple(student_tensors[key].shape)
        if tuple(value.shape) == target:
            continue
        same_rank = len(value.shape) == len(target)
        dims = [d for d, (a, b) in enumerate(zip(value.shape, target, strict=True)) if a != b] if same_rank else []
        if len(dims) != 1 or not key.startswith(head):
            raise StudentError(
                f"cannot narrow {key} from {tuple(value.shape)} to {target}: not one feed-forward dimension of a layer",
                hint="intermediate_size narrows the feed-forward layers of BERT-family, GPT-2 and Llama models.",
            )
        layer = key[len(head) :].partition(".")[0]
        by_layer.setdefault(layer, []).append((key, dims[0]))
    for entries in by_layer.values():
        importance: torch.Tensor | None = None
        for key, dim in entries:
            weight = teacher_tensors[key].detach().double()
            if weight.dim() < 2:
                continue
            norms = weight.movedim(dim, 0).flatten(1).norm(dim=1)
            importance = norms if importance is None else importance * norms
        assert importance is not None, "a feed-forward layer has at least one weight matrix"
        key, dim = entries[0]
        units = int(student_tensors[key].shape[dim])
        kept = torch.sort(torch.topk(importance, units).indices).values
        for key, dim in entries:
            out[key] = teacher_tensors[key].index_select(dim, kept.to(teacher_tensors[key].device)).clone()
    return out


def fresh_transformer(
    config: Any,
    *,
    auto_class: str = "AutoModelForSequenceClassification",
    seed: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """A freshly initialised transformers model from ``config``: a ``PretrainedConfig``, or a mapping with a
    ``model_type`` (``{"model_type": "bert", "vocab_size": 1000, "hidden_size": 64, ...}``). ``overrides`` set
    config fields (``num_hidden_layers=2``, ``num_labels=6``). ``auto_class``: the transformers class that builds it.
    ``seed``: initialise under ``torch.manual_seed(seed)`` without touching the global generator (None: the global
    generator)."""
    transformers = require("transformers", "transformer students")
    if isinstance(config, Mapping):
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise StudentError(
                f"a transformer config needs a model_type, got the keys {sorted(config)}",
                hint='add "model_type": "bert" (or "gpt2", "llama", ...).',
            )
        config = transformers.AutoConfig.for_model(model_type, **fields)
    else:
        config = copy.deepcopy(config)
    for name, value in overrides.items():
        setattr(config, name, value)
    factory = getattr(transformers, auto_class)
    if seed is None:
        return factory.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory.from_config(config)


# ---------------------------------------------------------------------------------------------------- registration


@register_student(
    "transformer",
    "Hugging Face transformer: N layers of the teacher (teacher=folder, layers, layer_map) or fresh (config) [hf]",
)
def transformer(
    in_shape: Sequence[int],
    num_classes: int,
    *,
    teacher: str | None = None,
    layers: int | None = None,
    layer_map: Sequence[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """A sequence classifier with ``num_classes`` outputs, mapping ``input_ids`` (batch, seq) [and
    ``attention_mask``] to (batch, classes) ``.logits``; ``in_shape`` (one row's token count) is not used.

    ``teacher``: a local folder (``save_pretrained`` output) of a sequence classifier; the student is
    :func:`from_teacher` of it with ``layers`` / ``layer_map`` / ``hidden_size`` / ``intermediate_size``. Without a
    teacher folder:
    a fresh model from ``config`` (a transformers config as a dict with ``model_type`` and ``vocab_size``; see
    :func:`fresh_transformer`). A run given a transformers teacher object builds the student from that object.
    """
    del in_shape
    if teacher is not None:
        if config is not None:
            raise StudentError(
                "the transformer student got both teacher and config",
                hint="teacher= copies layers from a saved model; config= builds a fresh one. Pass one of them.",
            )
        model = require("transformers", "transformer students").AutoModelForSequenceClassification.from_pretrained(
            teacher, local_files_only=True
        )
        labels = int(model.config.num_labels)
        if labels != num_classes:
            raise StudentError(
                f"the teacher folder {teacher} has {labels} labels but the run has {num_classes} classes",
                hint="point teacher= at the fine-tuned classifier whose outputs the student learns.",
            )
        return from_teacher(
            model, layers=layers, layer_map=layer_map, hidden_size=hidden_size, intermediate_size=intermediate_size
        )
    if config is None or "vocab_size" not in config:
        raise StudentError(
            f"the transformer student needs a teacher folder or a config with a vocab_size, got config={config!r}",
            hint='pass teacher="path/to/saved/model", or config={"model_type": "bert", "vocab_size": 30522, ...}.',
        )
    chosen = (("layers", layers), ("layer_map", layer_map), ("intermediate_size", intermediate_size))
    unused = {name: value for name, value in chosen if value is not None}
    if unused:
        raise StudentError(
            f"{sorted(unused)} choose layers of a teacher, but no teacher was given",
            hint="set num_hidden_layers (and hidden_size, intermediate_size) inside config= for a fresh transformer.",
        )
    fields = dict(config)
    fields.setdefault("model_type", "bert")
    if hidden_size is not None:
        fields["hidden_size"] = hidden_size
    return fresh_transformer(fields, num_labels=num_classes)


def student_from_teacher_factory(teacher_model: nn.Module, params: Mapping[str, Any]) -> Callable[[], nn.Module]:
    """The factory a run uses for ``student="transformer"`` given a transformers teacher object (not a folder):
    ``from_teacher(teacher_model, **params)`` (``layers``, ``layer_map``, ``hidden_size``, ``intermediate_size``), or
    a fresh model from
    ``params["config"]`` with the teacher's ``num_labels``. Parameter names are checked now, against the registered
    builder's (``kdistill list students``)."""
    from kdistill.students.base import STUDENTS

    STUDENTS.check_params("transformer", params)
    own = dict(params)
    own.pop("in_shape", None)
    if own.get("teacher") is not None:
        raise StudentError(
            "student param teacher= names a folder, but the run already has a transformers teacher",
            hint="leave student_params['teacher'] out: the student is built from the run's teacher.",
        )
    own.pop("teacher", None)
    config = own.pop("config", None)
    if config is not None:
        labels = int(getattr(getattr(teacher_model, "config", None), "num_labels", 2))
        return lambda: transformer([], labels, config=dict(config), **own)
    return lambda: from_teacher(teacher_model, **own)


def load_classifier(folder: str) -> nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)`` in eval mode: a
    ``teacher.factory`` for config files (``kind: torch``)."""
    model = require("transformers", "transformer students").AutoModelForSequenceClassification.from_pretrained(
        folder, local_files_only=True
    )
    return model.eval()


def from_folder(
    folder: str,
    *,
    layers: int | None = None,
    layer_map: Sequence[int] | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
) -> nn.Module:
    """:func:`from_teacher` of the classifier saved in ``folder``: a ``student.factory`` for config files
    (``kind: custom``, ``params: {folder: ..., layers: 3}``)."""
    return from_teacher(
        load_classifier(folder),
        layers=layers,
        layer_map=layer_map,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
    )
