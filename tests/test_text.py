"""Raw strings to token mappings (kdistill.text) with a tiny word-level tokenizer saved to a folder, and dynamic
padding per batch in the engine."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdistill.data import trim_padding
from kdistill.engine.batches import InMemorySource
from kdistill.errors import DataError, ShapeMismatchError
from kdistill.text import TruncationWarning, check_vocabulary, is_texts, load_tokenizer, max_positions, tokenize

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def word_texts(rows: int, seed: int) -> tuple[list[str], list[int]]:
    """Two classes of word-level texts: class 0 uses the first five words, class 1 the last five."""
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for row in range(rows):
        label = row % 2
        count = int(torch.randint(2, 6, (1,), generator=generator))
        picks = torch.randint(0, 5, (count,), generator=generator) + 5 * label
        texts.append(" ".join(WORDS[int(i)] for i in picks))
        labels.append(label)
    return texts, labels


def save_word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer with BERT's specials ([CLS] text [SEP], [PAD] = 0) saved with save_pretrained."""
    vocab = {token: index for index, token in enumerate([*SPECIALS, *WORDS])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(folder)
    return folder


def tiny_bert(vocab_size: int = len(SPECIALS) + len(WORDS), positions: int = 8) -> Any:
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=positions,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return save_word_tokenizer(tmp_path / "tok")


def test_texts_become_int64_ids_and_a_mask_padded_to_the_longest_row(folder: Path) -> None:
    batch = tokenize(["the cat sat", "a dog", "the dog ran far away"], folder)
    assert set(batch) >= {"input_ids", "attention_mask"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert ids.shape == (3, 7)  # [CLS] + 5 words + [SEP]
    assert mask.sum(1).tolist() == [5, 4, 7]
    vocab = load_tokenizer(folder).get_vocab()
    expected = [vocab[token] for token in ["[CLS]", "a", "dog", "[SEP]", "[PAD]", "[PAD]", "[PAD]"]]
    assert ids[1].tolist() == expected
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_rows_longer_than_the_model_are_truncated_with_one_warning(folder: Path) -> None:
    model = tiny_bert(positions=6)
    assert max_positions(model) == 6
    texts = ["the cat sat on the mat", "a dog", "the dog ran far away"]  # 8, 4 and 7 tokens
    with pytest.warns(TruncationWarning) as caught:
        batch = tokenize(texts, folder, model=model)
    assert len(caught) == 1
    assert "2 of 3 texts were longer than 6 tokens" in str(caught[0].message)
    assert batch["input_ids"].shape == (3, 6)
    sep = load_tokenizer(folder).sep_token_id
    assert batch["input_ids"][0, -1].item() == sep  # special tokens kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenize(texts, folder, max_length=16)["input_ids"].shape == (3, 8)  # nothing cut, no warning


def test_the_shorter_of_max_length_and_the_models_positions_wins(folder: Path) -> None:
    model = tiny_bert(positions=6)
    with pytest.warns(TruncationWarning, match="longer than 5 tokens"):
        batch = tokenize(["the cat sat on the mat", "a dog"], folder, model=model, max_length=5)
    assert batch["input_ids"].shape == (2, 5)
    with pytest.raises(DataError, match="max_length must be an integer >= 2"):
        tokenize(["a dog"], folder, max_length=0)


@pytest.mark.parametrize(("text", "word"), [("", "empty"), ("   \n\t", "whitespace only")])
def test_an_empty_string_is_an_error_naming_its_row(folder: Path, text: str, word: str) -> None:
    with pytest.raises(DataError, match=f"text row 2 is {word}"):
        tokenize(["the cat", "a dog", text, "ran"], folder)


def test_not_a_list_of_strings_is_an_error(folder: Path) -> None:
    with pytest.raises(DataError, match="texts must be a list of strings, got str"):
        tokenize("the cat", folder)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="text row 1 is a int"):
        tokenize(["the cat", 3], folder)  # type: ignore[list-item]
    with pytest.raises(DataError, match="no tokenizer folder"):
        tokenize(["the cat"], folder / "missing")


def test_a_tokenizer_larger_than_the_models_embeddings_is_an_error_with_both_sizes(folder: Path) -> None:
    small = tiny_bert(vocab_size=9)
    with pytest.raises(ShapeMismatchError, match=r"the tokenizer has 14 tokens but .* embeddings have 9 rows"):
        tokenize(["the cat"], folder, model=small)
    check_vocabulary(load_tokenizer(folder), tiny_bert(vocab_size=20))  # a larger table is fine


# ---------------------------------------------------------------------------------------------------- dynamic padding


def _padded() -> dict[str, torch.Tensor]:
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    ids = torch.arange(18).reshape(3, 6) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_trim_padding_cuts_columns_no_row_attends_to() -> None:
    inputs = _padded()
    trimmed = trim_padding({name: value[:2] for name, value in inputs.items()})
    assert {name: tuple(value.shape) for name, value in trimmed.items()} == {
        "input_ids": (2, 3),
        "attention_mask": (2, 3),
        "token_type_ids": (2, 3),
    }
    assert torch.equal(trimmed["input_ids"], inputs["input_ids"][:2, :3])
    whole = trim_padding(inputs)
    assert whole["input_ids"].shape == (3, 5)
    no_mask = {"input_ids": inputs["input_ids"]}
    assert trim_padding(no_mask) is no_mask


def test_an_in_memory_batch_is_trimmed_to_its_longest_row_for_per_row_targets() -> None:
    inputs = _padded()
    target = torch.tensor([0, 1, 0])
    source = InMemorySource(inputs, target)
    batch = source.gather(torch.tensor([1, 0]))
    assert batch.inputs["input_ids"].shape == (2, 3)  # type: ignore[index]
    assert torch.equal(batch.inputs["input_ids"], inputs["input_ids"][[1, 0], :3])  # type: ignore[index]
    lengths = {len(b.inputs["attention_mask"][0]) for b in source.batches(0, batch_size=1)}  # type: ignore[index]
    assert lengths == {2, 3, 5}
    # per-token targets (language models) keep every column: their teacher outputs are per position
    per_token = InMemorySource(inputs, torch.zeros(3, 6, dtype=torch.long))
    assert per_token.gather(torch.tensor([1])).inputs["input_ids"].shape == (1, 6)  # type: ignore[index]
    forced = InMemorySource(inputs, None, trim_padding=True).to(torch.device("cpu"))
    assert forced.gather(torch.tensor([1])).inputs["input_ids"].shape == (1, 2)  # type: ignore[index]


def test_a_trimmed_batch_gives_the_same_logits_as_the_padded_one() -> None:
    model = tiny_bert(vocab_size=20, positions=8)
    inputs = _padded()
    inputs["input_ids"] = inputs["input_ids"] % 20
    with torch.no_grad():
        padded = model(**{name: value[:2] for name, value in inputs.items()}).logits
        trimmed = model(**InMemorySource(inputs, torch.tensor([0, 1, 0])).gather(torch.tensor([0, 1])).inputs).logits
    assert torch.allclose(padded, trimmed, atol=1e-5)


def test_the_hf_teacher_takes_a_mapping_and_serves_its_attention_mask() -> None:
    from kdistill.teachers.hf import MASK_FEATURE, HFTeacher

    model = tiny_bert(vocab_size=20, positions=8)
    teacher = HFTeacher(model)
    inputs = _padded()
    inputs["input_ids"] = inputs["input_ids"] % 20
    out = teacher(inputs, features=[MASK_FEATURE, "bert.encoder.layer.0"])
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.allclose(out.logits, expected)
    assert torch.equal(out.features[MASK_FEATURE], inputs["attention_mask"])
    assert out.features["bert.encoder.layer.0"].shape == (3, 6, 8)


def test_is_texts_tells_raw_text_from_token_rows() -> None:
    assert is_texts(["a b", "c"]) and is_texts(("a",)) and is_texts(np.array(["a", "b c"]))
    assert not is_texts([]) and not is_texts(["a", 3]) and not is_texts(np.array([["a"], ["b"]]))
    assert not is_texts(np.zeros((2, 3), dtype=np.int64)) and not is_texts({"input_ids": [[1, 2]]})
