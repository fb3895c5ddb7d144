"""kdistill.lm: the offline corpus and tokenizer, token blocks, GPT-2 / Llama causal LMs, the vocabulary check (with
the padded-embedding case), a student from the teacher's layers, save_pretrained round trips, and a distillation
run of a causal LM through distill()."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import kdistill
from kdistill import lm
from kdistill.errors import ShapeMismatchError, StudentError

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

VOCAB = 300  # byte-level BPE: 256 bytes + the separator + merges


def _sources(tmp_path: Path) -> Path:
    root = tmp_path / "lib"
    for number in range(12):
        package = root / ("test" if number == 11 else f"pkg{number % 3}")
        package.mkdir(parents=True, exist_ok=True)
        body = "\n".join(f"def function_{number}_{i}(value):\n    return value * {i} + {number}\n" for i in range(30))
        (package / f"module{number}.py").write_text(f'"""Module {number}."""\n{body}')
    return root


def test_stdlib_split_is_by_module_deterministic_and_skips_test_suites(tmp_path: Path) -> None:
    root = _sources(tmp_path)
    train, val = lm.stdlib_sources(root=root, validation_share=0.3)
    assert (train, val) == lm.stdlib_sources(root=root, validation_share=0.3)
    assert len(train) + len(val) == 11  # the test/ package is left out
    assert not set(train) & set(val) and val
    real_train, real_val = lm.stdlib_sources(max_files=16)  # the installed standard library
    assert len(real_train) == 16 and len(real_val) == 2


def test_tokenizer_is_byte_level_bpe_and_blocks_are_whole(tmp_path: Path) -> None:
    train, _ = lm.stdlib_sources(root=_sources(tmp_path), validation_share=0.3)
    tokenizer = lm.train_tokenizer(train, VOCAB)
    assert lm.tokenizer_size(tokenizer) == VOCAB and tokenizer.token_to_id(lm.EOS) == 0
    again = lm.train_tokenizer(train, VOCAB)
    assert tokenizer.get_vocab() == again.get_vocab()
    text = "def ünïcode(x):\n\treturn x  # any byte round-trips\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    blocks = lm.encode_blocks(tokenizer, train, 16)
    stream = [i for t in train for i in [*tokenizer.encode(t).ids, 0]]
    assert blocks.dtype == torch.int64 and blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert lm.encode_blocks(tokenizer, train, 16, max_blocks=3).shape == (3, 16)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_student_from_teacher_layers_saves_and_loads_back(family: str, tmp_path: Path) -> None:
    teacher = lm.causal_lm(family, VOCAB, layers=4, width=32, heads=4, positions=32, seed=0).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert teacher(ids).logits.shape == (2, 12, VOCAB)
        copy = lm.lm_student(teacher, layer_map=[0, 1, 2, 3]).eval()
        torch.testing.assert_close(copy(ids).logits, teacher(ids).logits)  # every layer kept: the teacher itself
        student = lm.lm_student(teacher, layers=2).eval()
        assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
        assert not torch.allclose(student(ids).logits, teacher(ids).logits)
        lm.LMLogits(student).save_pretrained(tmp_path / "student")
        loaded = lm.load_causal_lm(tmp_path / "student")
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits)
    with pytest.raises(StudentError, match=r"holds no config\.json"):
        lm.load_causal_lm(tmp_path / "nowhere")


def test_vocabulary_mismatch_names_both_sizes_and_padded_embeddings_are_cut(tmp_path: Path) -> None:
    teacher = lm.causal_lm("gpt2", VOCAB, layers=1, width=16, heads=2, positions=16)
    other = lm.causal_lm("gpt2", VOCAB + 8, layers=1, width=16, heads=2, positions=16)
    with pytest.raises(
        ShapeMismatchError, match=f"teacher outputs {VOCAB} logits per token and the student {VOCAB + 8}"
    ):
        lm.check_vocabularies(teacher, other)
    assert lm.check_vocabularies(teacher, teacher) == VOCAB
    train, _ = lm.stdlib_sources(root=_sources(tmp_path), validation_share=0.3)
    tokenizer = lm.train_tokenizer(train, VOCAB - 6)  # both embeddings padded beyond what the tokenizer produces
    shared = lm.check_vocabularies(teacher, other, tokenizer=tokenizer)
    assert shared == VOCAB - 6
    ids = torch.tensor([tokenizer.encode("def f(x): return x").ids])
    assert int(ids.max()) < shared
    with torch.no_grad():
        assert lm.LMLogits(teacher, shared)(ids).shape[-1] == lm.LMLogits(other, shared)(ids).shape[-1] == shared
        torch.testing.assert_close(lm.LMLogits(teacher, shared)(ids), teacher(ids).logits[..., :shared])
    small = lm.train_tokenizer(train, VOCAB - 20)
    with pytest.raises(
        ShapeMismatchError, match=f"teacher's tokenizer has {VOCAB - 6} ids and the student's {VOCAB - 20}"
    ):
        lm.check_vocabularies(teacher, teacher, tokenizer=tokenizer, student_tokenizer=small)
    too_big = lm.train_tokenizer([*train, "".join(chr(c) for c in range(200, 400))], VOCAB + 40)
    with pytest.raises(ShapeMismatchError, match="the tokenizer produces"):
        lm.check_vocabularies(teacher, other, tokenizer=too_big)
    with pytest.raises(ShapeMismatchError, match="cannot cut"):
        lm.LMLogits(teacher, VOCAB + 1)


def test_a_causal_lm_distils_through_distill_with_a_token_divergence(tmp_path: Path) -> None:
    train, val = lm.stdlib_sources(root=_sources(tmp_path), validation_share=0.3)
    tokenizer = lm.train_tokenizer(train, VOCAB)
    ids, val_ids = lm.encode_blocks(tokenizer, train, 16, max_blocks=96), lm.encode_blocks(tokenizer, val, 16)
    teacher = lm.causal_lm("gpt2", VOCAB, layers=2, width=32, heads=2, positions=16, seed=0)
    student = lm.causal_lm("gpt2", VOCAB, layers=1, width=32, heads=2, positions=16, seed=1)
    result = kdistill.distill(
        lm.LMLogits(teacher), lm.LMLogits(student), ids, val=val_ids, task="token_lm", method="gjsd", epochs=3,
        lr=3e-3, verbose=False, profile=False, baseline=False,
    )  # fmt: skip
    history = result.history
    assert "train_kd" in history[-1] and "val_perplexity" in history[-1]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert isinstance(result.student, lm.LMLogits) and result.student.model is student  # trained in place


def test_on_policy_mixer_is_seeded_resumable_and_samples_only_continuations() -> None:
    student = lm.causal_lm("gpt2", VOCAB, layers=1, width=16, heads=2, positions=16, seed=0)
    ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    never, always = lm.OnPolicyMixer(0.0, prompt_length=4), lm.OnPolicyMixer(1.0, prompt_length=4, seed=3)
    kept, on_policy = never(student, ids)
    assert kept is ids and not on_policy
    sampled, on_policy = always(student, ids)
    assert on_policy and torch.equal(sampled[:, :4], ids[:, :4]) and not torch.equal(sampled[:, 4:], ids[:, 4:])
    assert student.training  # its mode is restored
    # at a temperature near 0 sampling is greedy decoding, computed here by hand one token at a time
    cold = lm.sample_continuations(student, ids, prompt_length=4, generator=torch.Generator(), temperature=1e-4)
    greedy = ids.clone()
    with torch.no_grad():
        for position in range(4, 10):
            greedy[:, position] = student(greedy[:, :position]).logits[:, -1].argmax(-1)
    assert torch.equal(cold, greedy)
    # the same seed gives the same batches; a mixer restored from a state dict continues the same stream
    half = lm.OnPolicyMixer(0.5, prompt_length=4, seed=1)
    first = [half(student, ids) for _ in range(3)]
    state = half.state_dict()
    later = [half(student, ids) for _ in range(3)]
    again = lm.OnPolicyMixer(0.5, prompt_length=4, seed=1)
    assert all(
        torch.equal(a[0], b[0]) and a[1] == b[1]
        for a, b in zip(first, [again(student, ids) for _ in range(3)], strict=True)
    )
    resumed = lm.OnPolicyMixer(0.5, prompt_length=4, seed=99)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(a[0], b[0]) and a[1] == b[1]
        for a, b in zip(later, [resumed(student, ids) for _ in range(3)], strict=True)
    )
    flips = [lm.OnPolicyMixer(0.5, prompt_length=4, seed=s)(student, ids[:1, :5])[1] for s in range(40)]
    assert 8 < sum(flips) < 32  # lambda = 0.5: about half the batches are the student's
    with pytest.raises(kdistill.DataError, match="prompt_length must be in"):
        lm.sample_continuations(student, ids, prompt_length=10, generator=torch.Generator())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_with_the_kv_cache_draws_what_the_whole_prefix_draws(family: str) -> None:
    student = lm.causal_lm(family, VOCAB, layers=2, width=16, heads=2, positions=16, seed=0)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    lengths: list[int] = []

    def record(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        lengths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    hook = student.register_forward_pre_hook(record, with_kwargs=True)
    try:
        cached = lm.sample_continuations(student, ids, prompt_length=5, generator=torch.Generator().manual_seed(2))
        calls_cached, lengths[:] = list(lengths), []
        plain = lm.sample_continuations(
            student, ids, prompt_length=5, generator=torch.Generator().manual_seed(2), kv_cache=False
        )
        calls_plain = list(lengths)
    finally:
        hook.remove()
    assert torch.equal(cached, plain) and not torch.equal(cached[:, 5:], ids[:, 5:])
    assert calls_cached == [5] + [1] * 6  # the prompt once, then one new position per token
    assert calls_plain == list(range(5, 12))  # the whole prefix every time
    # through the pipeline's wrapper, with its vocabulary cut: the cut is applied to the cached logits too
    wrapped = lm.LMLogits(student, vocab=VOCAB - 3)
    cut = lm.sample_continuations(wrapped, ids, prompt_length=5, generator=torch.Generator().manual_seed(2))
    cut_plain = lm.sample_continuations(
        wrapped, ids, prompt_length=5, generator=torch.Generator().manual_seed(2), kv_cache=False
    )
    assert torch.equal(cut, cut_plain) and int(cut[:, 5:].max()) < VOCAB - 3
    with pytest.raises(kdistill.ConfigError, match="kv_cache=True needs a Hugging Face causal LM"):
        lm.sample_continuations(torch.nn.Sequential(), ids, prompt_length=5, generator=torch.Generator(), kv_cache=True)
