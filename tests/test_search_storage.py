"""A killed search resumes where it stopped, and two processes share one study through a journal file; both run
`kdistill search` as a user would, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits_search.yaml"
QUICK = [
    "teacher.params.n_estimators=20",
    "train.epochs=3",
    "search.epochs=3",
    "search.patience=null",
    "search.pruner=none",
    "search.families=[mlp]",
    "report.profile=false",
    "report.privacy=false",
]


def _command(out: Path, *extra: str) -> list[str]:
    sets = [item for override in [*QUICK, f"out={out}"] for item in ("--set", override)]
    return [sys.executable, "-m", "kdistill.cli", "search", str(EXAMPLE), *sets, *extra]


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _study(journal: Path) -> Any:
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    return optuna.load_study(study_name="kdistill-search", storage=optuna.storages.journal.JournalStorage(backend))


def _trained(journal: Path) -> list[Any]:
    if not journal.exists() or journal.stat().st_size == 0:
        return []
    try:
        study = _study(journal)
    except KeyError:  # the study is not created yet
        return []
    return [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("trained")]


def test_a_killed_search_resumes_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "run"
    journal = out / "search" / "study.journal"
    worker = subprocess.Popen(
        _command(out, "--set", "search.trials=4"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 400
    while len(_trained(journal)) < 2 and time.monotonic() < deadline and worker.poll() is None:
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = {t.number: (t.params, t.value) for t in _trained(journal)}
    assert 2 <= len(before) < 4, "killed after two trained trials, before the fourth"
    assert not (out / "student.safetensors").exists()
    killed = [t for t in _study(journal).trials if t.state.name == "RUNNING"]

    done = subprocess.run(
        _command(out, "--set", "search.trials=4", "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    study = _study(journal)
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("trained")]
    assert len(trained) == 4  # the 2-3 from before and only the rest: nothing trained twice
    for number, (params, value) in before.items():  # the finished trials are kept as they were
        assert (study.trials[number].params, study.trials[number].value) == (params, value)
    pids = {t.user_attrs["worker"] for t in trained}
    assert len(pids) == 2  # the killed process's trials and the resumed one's
    for trial in killed:  # the trial the kill interrupted: marked failed and its candidate drawn again first
        assert study.trials[trial.number].state.name == "FAIL"
        reruns = [t for t in study.trials if t.user_attrs.get("rerun_of") == trial.number]
        # what the killed trial had drawn is kept (killed between two draws, the rest are drawn anew)
        assert len(reruns) == 1 and trial.params.items() <= reruns[0].params.items()
    saved = json.loads((out / "search" / "trials.json").read_text())
    assert [t["number"] for t in saved["trials"]] == [t.number for t in study.trials]
    assert (out / "student.safetensors").is_file() and "chosen student:" in done.stdout


def test_two_processes_share_one_study_through_a_journal_file(tmp_path: Path) -> None:
    journal = tmp_path / "shared.journal"
    workers = [
        subprocess.Popen(
            _command(
                tmp_path / f"worker{index}",
                "--search-only",
                "--set",
                "search.trials=4",
                "--set",
                f"search.storage={journal}",
            ),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    study = _study(journal)
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("trained")]
    assert 4 <= len(trained) <= 5  # each stops once the study holds 4; the other's last one may still finish
    assert len({t.user_attrs["worker"] for t in trained}) == 2, "both processes trained trials of the one study"
    assert len({t.number for t in study.trials}) == len(study.trials)
    drawn = [json.dumps(t.params, sort_keys=True) for t in trained]
    assert len(set(drawn)) == len(drawn), "the workers did not repeat each other's draws"
    last = max(
        (json.loads((tmp_path / f"worker{i}" / "search" / "trials.json").read_text()) for i in range(2)),
        key=lambda saved: len(saved["trials"]),
    )
    assert len(last["trials"]) == len(study.trials)
    assert all("chosen student:" in output for output in outputs)
