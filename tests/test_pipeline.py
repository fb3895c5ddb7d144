"""One pipeline: `kdistill run` and `kdistill.distill` build the same run, validate it the same way, and give the same
weights; a Python run folder resumes as a YAML one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kdistill
from kdistill.config import load_config
from kdistill.datasets import load_dataset
from kdistill.errors import CheckpointError, ConfigError, DataError
from kdistill.pipeline import build_loss, prepare
from kdistill.run import run, run_spec

MODELS = """
import torch
from torch import nn


class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.layers = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10))

    def forward(self, x):
        return self.layers(x / 16.0)


def make_teacher():
    return Teacher()


def jitter(x, generator):
    return x + 0.5 * torch.randn(x.shape, generator=generator)
"""

CONFIG = """
name: parity
seed: 0
data: {dataset: digits}
teacher: {kind: torch, factory: "pmodels:make_teacher"}
student: {kind: mlp, params: {hidden: [16]}}
method:
  - {name: kd, params: {temperature: 2.0, soft_weight: 0.5}}
  - {name: fitnet, weight: 0.5, params: {student_layers: layers.1, teacher_layers: layers.1}}
train:
  epochs: 3
  batch_size: 64
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0}
  schedule: {name: constant}
device: {type: cpu}
report: {baseline: false}
"""


SGD_CONSTANT = {  # the optimizer and schedule of CONFIG, as the API's settings
    "train": {
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
    }
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pmodels.py").write_text(MODELS)
    (tmp_path / "parity.yaml").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _api_run(**extra: object) -> kdistill.DistillResult:
    import pmodels  # the test's own module, written by the fixture

    data = load_dataset("digits", 0)
    return kdistill.distill(
        pmodels.make_teacher(),
        "mlp",
        data.train,
        val=data.val,
        test=data.test,
        method={"kd": 1.0, "fitnet": 0.5},
        temperature=2.0,
        method_params={"fitnet": {"student_layers": "layers.1", "teacher_layers": "layers.1"}},
        hidden=(16,),
        epochs=3,
        baseline=False,
        profile=False,
        verbose=False,
        settings=SGD_CONSTANT,
        **extra,  # type: ignore[arg-type]
    )


def test_yaml_and_api_give_the_same_weights_with_a_composed_fitnet(project: Path) -> None:
    yaml_result = run(project / "parity.yaml", overrides=[f"out={project / 'yaml'}"], verbose=False).result
    api_result = _api_run()
    assert yaml_result is not None
    yaml_state, api_state = yaml_result.student.state_dict(), api_result.student.state_dict()
    assert yaml_state.keys() == api_state.keys()
    for name, value in yaml_state.items():
        assert torch.equal(value, api_state[name]), name
    # the same terms under the same names; the hard-label term is counted once (KD's), fitnet adds only its hint
    yaml_terms = {key for key in yaml_result.history[-1] if key.startswith("train_")}
    assert yaml_terms == {key for key in api_result.history[-1] if key.startswith("train_")}
    assert {"train_kd/ce", "train_kd/kd", "train_fitnet/hint"} <= yaml_terms
    assert not any(key.startswith("train_fitnet/ce") for key in yaml_terms)


def test_a_yaml_run_trains_the_fitnet_projector(project: Path) -> None:
    config = load_config(project / "parity.yaml", [f"out={project / 'projector'}"])
    spec = run_spec(config, verbose=False)
    prepared = prepare(spec)
    loss = prepared.loss
    assert isinstance(loss, nn.Module)  # a Compose of kd and fitnet: its projector is a submodule
    from kdistill.engine import TransferSet, fit
    from kdistill.pipeline import train_config

    train = prepared.splits["train"]
    assert train is not None
    fit(
        prepared.student,
        loss,
        TransferSet(train.x, train.y, prepared.targets),
        config=train_config(config, False),
        teacher=prepared.teacher,
    )
    projector = [p for p in loss.parameters() if p.requires_grad]
    assert projector, "the FitNets projector has no parameters"
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in projector)


def test_a_yaml_method_list_is_one_compose_with_weights() -> None:
    config = load_config(
        Path(__file__).resolve().parents[1] / "examples" / "digits_rf_mlp.yaml",
        ["method=[{name: kd, weight: 0.7}, {name: ce, weight: 0.3}]"],
    )
    loss = build_loss(config.method)
    assert isinstance(loss, nn.Module) and loss.weights == {"kd": 0.7, "ce": 0.3}


@pytest.mark.parametrize(
    ("api_argument", "yaml_override", "expected"),
    [
        ({"batch_size": 0}, "train.batch_size=0", r"train\.batch_size: Input should be greater than 0"),
        ({"epochs": 0}, "train.epochs=0", r"train\.epochs: Input should be greater than 0"),
        ({"lr": -1.0}, "train.optimizer.lr=-1", r"train\.optimizer\.lr: Input should be greater than 0"),
        ({"cache_storage": "topk:0"}, "cache.storage=topk:0", r"cache\.storage: unknown cache storage 'topk:0'"),
        ({"method": "kdd"}, "method=kdd", r"unknown method 'kdd'; did you mean 'kd'\?"),
    ],
)
def test_a_bad_value_gets_the_same_error_from_the_api_and_from_yaml(
    digits, forest, api_argument: dict[str, object], yaml_override: str, expected: str
) -> None:
    config = Path(__file__).resolve().parents[1] / "examples" / "digits_rf_mlp.yaml"
    with pytest.raises(ConfigError, match=expected) as from_yaml:
        load_config(config, [yaml_override])
    with pytest.raises(ConfigError, match=expected) as from_api:
        kdistill.distill(forest, "mlp", digits["train"], verbose=False, **api_argument)  # type: ignore[arg-type]
    assert str(from_api.value).startswith("distill(): 1 error")
    assert str(from_yaml.value).split(":", 1)[1].strip().startswith("1 error")


def test_a_validation_split_of_another_width_fails_before_training(digits, forest, tmp_path: Path) -> None:
    x_val, y_val = digits["val"]
    with pytest.raises(DataError, match=r"val X has rows of shape \(63,\) but train X has \(64,\)"):
        kdistill.distill(forest, "mlp", digits["train"], val=(x_val[:, :63], y_val), verbose=False, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing written


def test_settings_and_a_differing_argument_clash(digits, forest) -> None:
    with pytest.raises(ConfigError, match=r"epochs=5 and settings train\.epochs=7 disagree"):
        kdistill.distill(forest, "mlp", digits["train"], epochs=5, settings={"train": {"epochs": 7}}, verbose=False)
    unknown_key = r"distill\(\): 1 error:\n    train\.epoch: unknown key; did you mean 'epochs'\?"
    with pytest.raises(ConfigError, match=unknown_key):
        kdistill.distill(forest, "mlp", digits["train"], settings={"train": {"epoch": 7}}, verbose=False)


def test_a_python_run_folder_checkpoints_and_resumes(digits, forest, tmp_path: Path) -> None:
    out = tmp_path / "api-run"
    small = (digits["train"][0][:300], digits["train"][1][:300])
    common = {"val": digits["val"], "epochs": 3, "verbose": False, "profile": False, "seed": 1}
    first = kdistill.distill(forest, "mlp", small, out=out, **common)  # type: ignore[arg-type]
    names = {path.name for path in out.iterdir()}
    assert {
        "config.json",
        "checkpoint-student.safetensors",
        "checkpoint-baseline.safetensors",
        "metrics.jsonl",
        "student.safetensors",
        "history.json",
        "report.json",
        "cache",
    } <= names
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["train"]["epochs"] == 3
    assert saved["fingerprint"]["teacher"] == kdistill.as_teacher(forest).fingerprint()
    with pytest.raises(ConfigError, match="already holds a run"):
        kdistill.distill(forest, "mlp", small, out=out, **common)  # type: ignore[arg-type]
    again = kdistill.distill(forest, "mlp", small, out=out, resume=True, **common)  # type: ignore[arg-type]
    for name, value in first.student.state_dict().items():
        assert torch.equal(value, again.student.state_dict()[name])
    with pytest.raises(CheckpointError, match="the config changed"):
        kdistill.distill(forest, "mlp", small, out=out, resume=True, **(common | {"epochs": 4}))  # type: ignore[arg-type]


def test_the_api_reaches_every_setting_a_config_has(digits, forest) -> None:
    """Optimizer, schedule and precision from the API's settings change the run as they do in YAML."""
    small = (digits["train"][0][:200], digits["train"][1][:200])
    common = {"epochs": 2, "verbose": False, "profile": False, "baseline": False, "report": False}
    adamw = kdistill.distill(forest, "mlp", small, **common)  # type: ignore[arg-type]
    sgd = kdistill.distill(forest, "mlp", small, settings={"train": {"optimizer": {"name": "sgd"}}}, **common)  # type: ignore[arg-type]
    bf16 = kdistill.distill(forest, "mlp", small, settings={"device": {"precision": "bf16"}}, **common)  # type: ignore[arg-type]
    first = "layers.0.weight"
    assert not torch.equal(adamw.student.state_dict()[first], sgd.student.state_dict()[first])
    assert not torch.equal(adamw.student.state_dict()[first], bf16.student.state_dict()[first])


def test_augmentation_from_yaml_matches_the_api(project: Path) -> None:
    config = project / "parity.yaml"
    overrides = [f"out={project / 'aug'}", "augment.function=pmodels:jitter", "method=kd", "train.epochs=2"]
    yaml_result = run(config, overrides=overrides, verbose=False).result
    import pmodels

    data = load_dataset("digits", 0)
    api_result = kdistill.distill(
        pmodels.make_teacher(),
        "mlp",
        data.train,
        val=data.val,
        test=data.test,
        hidden=(16,),
        epochs=2,
        temperature=4.0,
        augment=pmodels.jitter,
        baseline=False,
        profile=False,
        verbose=False,
        settings=SGD_CONSTANT,
    )
    assert yaml_result is not None
    for name, value in yaml_result.student.state_dict().items():
        assert torch.equal(value, api_result.student.state_dict()[name]), name


class _Embedder(nn.Module):
    """A fixed teacher: digits rows -> 16-dimensional embeddings."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x / 16.0)


def test_an_embedding_task_runs_end_to_end(digits) -> None:
    x_train, x_val, x_test = digits["train"][0], digits["val"][0], digits["test"][0]
    common = {"task": "embedding", "epochs": 40, "verbose": False, "profile": False, "hidden": (64,)}
    with pytest.raises(ConfigError, match=r"method 'kd' does not fit task 'embedding'.*\n.*use 'cosine' or 'mse'"):
        kdistill.distill(_Embedder(), "mlp", x_train, **common)  # kd's softmax over dimensions means nothing
    result = kdistill.distill(_Embedder(), "mlp", x_train, val=x_val, test=x_test, method="cosine", **common)
    assert result.baseline is None  # no labels: nothing to learn without the teacher
    assert "val_cosine" in result.history[-1] and "val_accuracy" not in result.history[-1]
    report = result.report
    assert report is not None and report.settings["task"] == "embedding"
    student, teacher = report.models["student"], report.models["teacher"]
    # the report's cosine is the mean cosine similarity to the teacher's embeddings on the test rows
    with torch.no_grad():
        ours = result.student(torch.tensor(x_test, dtype=torch.float32))
        theirs = _Embedder()(torch.tensor(x_test, dtype=torch.float32))
    expected = float(torch.nn.functional.cosine_similarity(ours, theirs, dim=1).mean())
    assert student["cosine"] == pytest.approx(expected, abs=1e-5)
    assert teacher["cosine"] == pytest.approx(1.0) and student["retention"] == pytest.approx(student["cosine"])
    assert student["cosine"] > 0.9


class _Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the current token only: (batch, seq) ids -> (batch, seq, vocab)."""

    def __init__(self, vocab: int = 12, seed: int = 0, scale: float = 3.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(vocab, vocab)
        nn.init.normal_(self.table.weight, std=scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


def test_a_token_lm_task_runs_end_to_end(tmp_path: Path) -> None:
    teacher, student = _Bigram(seed=0), _Bigram(seed=1, scale=0.1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.empty(400, 10, dtype=torch.long)  # text the teacher would write: each next token drawn from it
    ids[:, 0] = torch.randint(0, 12, (400,), generator=generator)
    with torch.no_grad():
        for position in range(1, 10):
            probs = teacher.table.weight[ids[:, position - 1]].softmax(-1)
            ids[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    with pytest.raises(kdistill.StudentError, match="task 'token_lm' needs your own student module"):
        kdistill.distill(teacher, "mlp", ids, task="token_lm", verbose=False)
    result = kdistill.distill(
        teacher,
        student,
        ids[:300],
        val=ids[300:350],
        test=ids[350:],
        task="token_lm",
        temperature=1.0,
        soft_weight=1.0,
        epochs=30,
        lr=0.1,
        weight_decay=0.0,
        verbose=False,
        profile=False,
        baseline=False,
        cache_dir=tmp_path / "cache",
    )
    history = result.history
    assert {"val_loss", "val_perplexity", "val_token_accuracy"} <= set(history[-1])
    report = result.report
    assert report is not None
    metrics = report.models["student"]
    # per-token agreement with the teacher's argmax, computed by hand over every position but the last
    with torch.no_grad():
        agree = (result.student(ids[350:]).argmax(-1) == teacher(ids[350:]).argmax(-1))[:, :-1].float().mean()
    assert metrics["agreement"] == pytest.approx(float(agree), abs=1e-6)
    assert metrics["agreement"] > 0.9
    assert metrics["perplexity"] == pytest.approx(report.models["teacher"]["perplexity"], rel=0.05)
    # the teacher's token logits went through the cache, (rows, seq, vocab) per row
    from kdistill.cache import cache_entries

    complete = [entry for entry in cache_entries(tmp_path / "cache") if entry.status == "complete"]
    assert len(complete) == 1


def test_a_token_lm_report_opens_with_a_paired_bootstrap_verdict() -> None:
    teacher = _Bigram(seed=0)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (160, 8), generator=generator)
    result = kdistill.distill(
        teacher,
        _Bigram(seed=1, scale=0.1),
        ids[:100],
        val=ids[100:130],
        test=ids[130:],
        task="token_lm",
        temperature=1.0,
        epochs=3,
        verbose=False,
        profile=False,
    )
    assert result.report is not None and result.baseline is not None
    verdict = result.report.verdict
    assert verdict is not None and verdict.test == "paired_bootstrap" and verdict.rows == 30
    target = ids[130:].roll(-1, dims=1)
    counted = torch.ones_like(target, dtype=torch.bool)
    counted[:, -1] = False  # the last position predicts nothing
    with torch.no_grad():
        rows = ((result.student(ids[130:]).argmax(-1) == target) & counted).sum(1) / counted.sum(1)
    assert verdict.student == pytest.approx(float(rows.mean()), abs=1e-6)
    assert verdict.interval is not None and verdict.interval[0] <= verdict.difference <= verdict.interval[1]
    assert result.report.lines()[0].startswith("verdict:")


TOKEN_MODELS = """
import torch
from torch import nn


class Bigram(nn.Module):
    def __init__(self, seed: int = 0, scale: float = 3.0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(12, 12)
        nn.init.normal_(self.table.weight, std=scale)

    def forward(self, ids):
        return self.table(ids)
"""

TOKEN_CONFIG = """
name: tokens
task: token_lm
data: {train: {path: ids.npz}, val: {path: ids.npz}}
teacher: {kind: torch, factory: "tmodels:Bigram"}
student: {kind: custom, factory: "tmodels:Bigram", params: {seed: 1, scale: 0.1}}
method: {name: kd, params: {temperature: 1.0, soft_weight: 1.0}}
train: {epochs: 2, batch_size: 32}
device: {type: cpu}
report: {baseline: false}
"""


def test_a_yaml_run_reads_its_files_as_its_task_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """token ids from an .npz stay int64 and get next-token targets, as from the Python API."""
    import numpy as np

    ids = np.random.default_rng(0).integers(0, 12, (64, 6))
    np.savez(tmp_path / "ids.npz", x=ids, y=np.zeros(len(ids), dtype=np.int64))
    (tmp_path / "tmodels.py").write_text(TOKEN_MODELS)
    (tmp_path / "tokens.yaml").write_text(TOKEN_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(tmp_path / "tokens.yaml", [f"out={tmp_path / 'run'}"])
    prepared = prepare(run_spec(config, verbose=False))
    train = prepared.splits["train"]
    assert train is not None and train.x.dtype == torch.int64
    assert torch.equal(train.x, torch.as_tensor(ids))
    assert (
        train.y is not None and bool((train.y[:, :-1] == train.x[:, 1:]).all()) and bool((train.y[:, -1] == -100).all())
    )
    outcome = run(config, verbose=False)
    assert outcome.result is not None and "val_perplexity" in outcome.result.history[-1]
