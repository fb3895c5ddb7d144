"""A tiny sentence encoder for the sentence tests: a WordPiece vocabulary of a few dozen tokens, a 2-layer 32-wide
BERT (seeded), and sentences made of those words. Built in a temporary folder; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "of", "to", "and", "array", "matrix", "sum", "return", "values", "compute", "sorted", "data",
    "model", "train", "test", "small", "large", "fast", "slow", "input", "output", "value", "list", "file",
    "read", "write", "tensor", "shape", "mean", "on", "is", "are", "dist", "##ill", "##ation", "##s", "##ed",
    "##ing", "e", "s", "d",
    "t", "i", "l", "n", "o", "r", "##e", "##d", "##t", "##i", "##l", "##n", "##o", "##r", ".", ",",
]  # fmt: skip

SENTENCES = [
    "Return the sum of the array.",
    "Compute the mean of a matrix.",
    "Read the data file and write the output.",
    "Train a small model on the data.",
    "Test a large model, fast.",
    "The values of the tensor are sorted.",
    "Return a list of values.",
    "Compute the shape of the input tensor.",
    "Write the sorted list to a file.",
    "The model is slow to train.",
    "Read the input and return the output.",
    "The distillation of a large model.",
    "Sum the values and return the mean.",
    "A fast model of the data.",
    "Compute the sorted values of the array.",
    "Train and test the model on a file.",
]


def tiny_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """A WordPiece BertTokenizer over SPECIAL + WORDS, saved to ``folder`` and loaded back from there."""
    from transformers import AutoTokenizer, BertTokenizer

    BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL + WORDS)}, do_lower_case=True).save_pretrained(
        str(folder)
    )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_bert(vocab_size: int, *, layers: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertModel(config).eval()
