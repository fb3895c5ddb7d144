"""Unlabeled texts for transformer students: raw strings tokenized with the splits (or a token mapping), joined to
the labelled rows padded to one length, labelled once by the teacher through the cache, kept out of the hard term;
the YAML ``data.unlabeled`` .npz of named inputs; the bad inputs. Tiny models and a word-level tokenizer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kdistill
from kdistill.cache import cache_key, open_entry
from kdistill.data import concat_rows
from kdistill.errors import ConfigError, DataError
from kdistill.teachers import as_teacher, teacher_logits
from kdistill.text import TruncationWarning, tokenize, tokenize_splits

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_text import save_word_tokenizer  # noqa: E402
from test_text import word_texts as _texts  # noqa: E402


def _teacher(positions: int = 16) -> Any:
    config = transformers.BertConfig(
        vocab_size=14,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=positions,
        num_labels=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


class _Calls:
    """Records the number of rows of every forward call of a model (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows: list[int] = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(len(ids))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save_word_tokenizer(tmp_path / "tok")


def _run(teacher: Any, folder: Path, **extra: Any) -> Any:
    arguments: dict[str, Any] = {
        "val": _texts(10, 2),
        "test": _texts(9, 3),
        "tokenizer": folder,
        "student_params": {"layers": 1},
        "epochs": 1,
        "batch_size": 8,
        "lr": 1e-3,
        "profile": False,
        "verbose": False,
    }
    return kdistill.distill(teacher, "transformer", _texts(12, 0), **(arguments | extra))


# ---------------------------------------------------------------------------------------------------- concat_rows


def test_concat_rows_pads_token_rows_to_the_longer_sequence_with_the_pad_id_and_mask_zero() -> None:
    short = {
        "input_ids": torch.tensor([[2, 5, 3]]),
        "attention_mask": torch.tensor([[1, 1, 1]]),
        "token_type_ids": torch.tensor([[0, 0, 0]]),
    }
    long = {
        "input_ids": torch.tensor([[2, 6, 7, 8, 3], [2, 9, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "token_type_ids": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]),
    }
    joined = concat_rows([short, long], pad_token_id=7)
    assert isinstance(joined, dict) and sorted(joined) == ["attention_mask", "input_ids", "token_type_ids"]
    assert joined["input_ids"].tolist() == [[2, 5, 3, 7, 7], [2, 6, 7, 8, 3], [2, 9, 3, 0, 0]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert joined["token_type_ids"].tolist() == [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
    assert joined["input_ids"].dtype == torch.int64
    tensors = concat_rows([torch.ones(2, 3), torch.zeros(1, 3)])
    assert isinstance(tensors, torch.Tensor) and tensors.sum().item() == 6.0 and tensors.shape == (3, 3)


def test_a_padded_row_gives_the_teachers_logits_of_the_unpadded_row(folder: Path) -> None:
    teacher = _teacher()
    short = tokenize(["the cat"], folder)
    long = tokenize(["the cat sat on the mat a dog"], folder)
    joined = concat_rows([short, long], pad_token_id=int(teacher.config.pad_token_id))
    assert isinstance(joined, dict) and joined["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.inference_mode():
        alone = teacher(**short).logits
        padded = teacher(**{name: value[:1] for name, value in joined.items()}).logits
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


def test_concat_rows_refuses_mismatched_keys_and_a_mix_of_kinds() -> None:
    ids = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(DataError, match=r"different keys: \['attention_mask', 'input_ids'\] and \['input_ids'\]"):
        concat_rows([ids, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(DataError, match="different kinds"):
        concat_rows([ids, torch.zeros(1, 3)])


# ---------------------------------------------------------------------------------------------------- tokenize_splits


def test_tokenize_splits_names_the_unlabeled_split_in_errors_and_in_the_truncation_warning(folder: Path) -> None:
    texts = ["the cat sat on the mat a dog ran far away", "a dog"]  # 13 and 4 tokens
    with pytest.raises(DataError, match=r"unlabeled text row 1 is empty"):
        tokenize_splits(
            [(["a dog"], [0]), None, None, ["the cat", ""]], folder, names=("train", "val", "test", "unlabeled")
        )
    with pytest.warns(TruncationWarning) as caught:
        out = tokenize_splits(
            [(["a dog"], [0]), None, None, texts], folder, max_length=6, names=("train", "val", "test", "unlabeled")
        )
    assert len(caught) == 1 and "1 of 3 texts were longer than 6 tokens" in str(caught[0].message)
    assert "(unlabeled 1)" in str(caught[0].message)
    assert out[1] is None and out[3]["input_ids"].shape == (2, 6) and out[0][1] == [0]
    with pytest.raises(DataError, match=r"split 4 text row 0 is empty"):
        tokenize_splits([None, None, None, None, [""]], folder)


# ---------------------------------------------------------------------------------------------------- the API


def test_unlabeled_texts_are_labelled_once_through_the_cache_and_join_the_students_rows(
    folder: Path, tmp_path: Path
) -> None:
    teacher = _teacher()
    calls = _Calls(teacher)
    unlabeled = [text for text, _ in zip(*_texts(7, 5), strict=True)]
    unlabeled[3] = "the cat sat on the mat a dog ran far away the cat"  # the longest row of any split
    cache = tmp_path / "cache"
    result = _run(teacher, folder, unlabeled=unlabeled, cache_dir=cache, baseline=False)
    assert 7 in calls.rows  # the teacher labelled the 7 unlabeled rows in one call
    train_texts, train_labels = _texts(12, 0)
    names = ("train", "val", "test", "unlabeled")
    tokenized = tokenize_splits([(train_texts, train_labels), None, None, unlabeled], folder, names=names)[3]
    assert tokenized["input_ids"].shape[1] == 15  # longer than every training row: the join pads the training rows
    entry = open_entry(cache, cache_key(as_teacher(teacher), tokenized, storage="fp32"))
    assert entry is not None and tuple(entry.shape) == (2,)
    torch.testing.assert_close(entry.teacher_targets(), teacher_logits(as_teacher(teacher), tokenized))
    report = result.report
    assert report is not None
    rows = report.settings["transfer_rows"]
    assert rows["labelled"]["rows"] == 12 and rows["unlabeled"]["rows"] == 7
    assert any("labelled 12" in line and "unlabeled 7" in line for line in report.lines())
    calls.rows.clear()
    _run(teacher, folder, unlabeled=unlabeled, cache_dir=cache, baseline=False, report=False)
    assert 7 not in calls.rows  # read back from the cache, not recomputed


def test_unlabeled_token_rows_are_kept_out_of_the_hard_term(folder: Path) -> None:
    from kdistill.config import validate_settings
    from kdistill.pipeline import RunSpec, _student_rows, prepare

    teacher = _teacher()
    train_texts, labels = _texts(12, 0)
    splits = tokenize_splits([(train_texts, labels), None, None, ["the cat sat on the mat a dog ran far"]], folder)
    spec = RunSpec(
        settings=validate_settings({"device": {"type": "cpu"}}),
        train=splits[0],
        teacher=as_teacher(teacher),
        student=kdistill.students.transformer.from_teacher(teacher, layers=1),
        unlabeled=splits[3],
    )
    prepared = prepare(spec)
    train = prepared.splits["train"]
    assert train is not None
    transfer, source = _student_rows(spec, prepared, train)
    assert source is None and transfer.label_mask is not None and transfer.teacher_logits is not None
    assert transfer.label_mask.tolist() == [True] * 12 + [False]
    assert isinstance(transfer.x, dict) and transfer.x["input_ids"].shape == (13, 12)
    assert int(transfer.x["attention_mask"][:12, train.x["input_ids"].shape[1] :].sum()) == 0  # padding, unattended
    torch.testing.assert_close(transfer.teacher_logits[12:], teacher_logits(as_teacher(teacher), splits[3]))


def test_an_already_tokenized_unlabeled_mapping_is_accepted(folder: Path) -> None:
    unlabeled = tokenize(["a dog ran", "the mat"], folder)
    result = _run(_teacher(), folder, unlabeled=unlabeled, baseline=False)
    assert result.report is not None and result.report.settings["transfer_rows"]["unlabeled"]["rows"] == 2


# ---------------------------------------------------------------------------------------------------- bad input


def test_an_empty_unlabeled_text_is_an_error_naming_the_split_and_row(folder: Path) -> None:
    with pytest.raises(DataError, match=r"unlabeled text row 2 is whitespace only"):
        _run(_teacher(), folder, unlabeled=["the cat", "a dog", "  "])


def test_an_unlabeled_mapping_with_other_keys_is_an_error_naming_both(folder: Path) -> None:
    ids = tokenize(["a dog ran"], folder)
    only_ids = {"input_ids": ids["input_ids"]}
    with pytest.raises(DataError, match=r"inputs \['input_ids'\] but the training rows have \['attention_mask'"):
        _run(_teacher(), folder, unlabeled=only_ids)
    with pytest.raises(DataError, match=r"the training rows are a mapping of inputs .* the unlabeled rows are one"):
        _run(_teacher(), folder, unlabeled=np.zeros((2, 5), dtype=np.int64))


def test_unlabeled_texts_without_a_tokenizer_are_a_clear_error(folder: Path) -> None:
    train = tokenize_splits([_texts(12, 0)], folder)[0]
    with pytest.raises(DataError, match=r"unlabeled= holds 2 raw strings, but no tokenizer= was given"):
        kdistill.distill(_teacher(), "transformer", train, unlabeled=["a dog", "the cat"], verbose=False)


def test_unlabeled_texts_and_augment_cannot_be_combined(folder: Path) -> None:
    with pytest.raises(ConfigError, match="augment= and unlabeled/transfer rows cannot be combined"):
        _run(_teacher(), folder, unlabeled=["a dog ran"], augment=lambda x, generator: x)


def test_a_transfer_generator_on_token_rows_is_a_clear_error(folder: Path) -> None:
    from kdistill.transfer import Mixup

    with pytest.raises(ConfigError, match="makes rows of features, but the training rows are a mapping"):
        _run(_teacher(), folder, unlabeled=["a dog ran"], transfer=Mixup())


# ---------------------------------------------------------------------------------------------------- YAML


def _save(path: Path, inputs: dict[str, torch.Tensor], labels: list[int] | None) -> None:
    arrays = {f"x.{key}": value.numpy() for key, value in inputs.items()}
    if labels is not None:
        arrays["y"] = np.asarray(labels)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _config(tmp_path: Path, folder: Path, unlabeled: str) -> Path:
    teacher = tmp_path / "teacher"
    _teacher().save_pretrained(teacher)
    save_word_tokenizer(teacher)
    for name, (rows, seed) in {"train": (12, 0), "val": (10, 2), "test": (9, 3)}.items():
        texts, labels = _texts(rows, seed)
        _save(tmp_path / f"{name}.npz", tokenize(texts, folder), labels)
    config = tmp_path / "run.yaml"
    config.write_text(
        "name: unlabeled-texts\n"
        "data:\n"
        "  train: {path: train.npz}\n"
        "  val: {path: val.npz}\n"
        "  test: {path: test.npz}\n"
        f"  unlabeled: {unlabeled}\n"
        "teacher: {kind: hf, path: teacher}\n"
        "student: {kind: transformer, params: {teacher: teacher, layers: 1}}\n"
        "train: {epochs: 1, batch_size: 8, optimizer: {name: adamw, lr: 0.001, weight_decay: 0.01}}\n"
        "report: {profile: false}\n"
    )
    return config


def test_a_config_reads_unlabeled_token_rows_from_named_npz_arrays(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdistill.run import run

    monkeypatch.chdir(tmp_path)  # the run folder, runs/<name>, is made here
    config = _config(tmp_path, folder, "unlabeled.npz")
    _save(tmp_path / "unlabeled.npz", tokenize(["a dog ran far", "the cat", "sat on the mat"], folder), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = run(config, verbose=False)
    assert outcome.result is not None and outcome.result.report is not None
    rows = outcome.result.report.settings["transfer_rows"]
    assert rows["labelled"]["rows"] == 12 and rows["unlabeled"]["rows"] == 3


def test_a_config_unlabeled_npz_without_x_arrays_is_a_clear_error(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdistill.run import run

    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path, folder, "unlabeled.npz")
    np.savez(tmp_path / "unlabeled.npz", ids=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(DataError, match=r"has neither an array 'x' nor named inputs 'x.<name>' \(it holds \['ids'\]\)"):
        run(config, verbose=False)
