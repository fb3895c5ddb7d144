"""A killed search resumes where it stopped, and two processes share one study through a journal file; both run
`kdistill search` as a user would, in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


_DIE_IN_THE_THIRD_TRAINING = """
import os, signal, sys
from kdistill.search import study
from kdistill.cli import main

short_settings, started = study.short_settings, []


def dying(*args, **kwargs):  # called once per trained trial, after its draw is tagged with this process
    started.append(1)
    if len(started) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return short_settings(*args, **kwargs)


study.short_settings = dying
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_search_resumes_where_it_stopped(tmp_path: Path) -> None:
    out = tmp_path / "run"
    journal = out / "search" / "study.journal"
    # the process kills itself as the third trained trial starts: a kill at a known point, however fast the machine
    command = _command(out, "--set", "search.trials=4")
    killed_run = subprocess.run(
        [sys.executable, "-c", _DIE_IN_THE_THIRD_TRAINING, *command[3:]], env=_env(), capture_output=True, timeout=600
    )
    assert killed_run.returncode == -signal.SIGKILL, killed_run.stdout + killed_run.stderr
    before = {t.number: (t.params, t.value) for t in _trained(journal)}
    assert len(before) == 2, "killed after two trained trials"
    assert not (out / "student.safetensors").exists()
    killed = [t for t in _study(journal).trials if t.state.name == "RUNNING"]
    assert len(killed) == 1

    done = subprocess.run(
        _command(out, "--set", "search.trials=4", "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    study = _study(journal)
    trained = [t for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("trained")]
    assert len(trained) == 4  # the 2 from before and only the rest: nothing trained twice
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


def test_a_worker_that_raced_another_for_a_seed_draws_again(tmp_path: Path) -> None:
    """Both workers count the trials, then ask: the same count seeds the same sampler, so the same draw; the one
    whose trial was numbered past its count drops its draw (the race the shared-study test can hit under load)."""
    from kdistill.search.study import _check_not_raced, _Duplicate, _sampler

    storage = optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "shared.journal"))
    )
    first, second = (optuna.create_study(storage=storage, study_name="s", load_if_exists=True) for _ in range(2))
    seen = [len(study.get_trials()) for study in (first, second)]  # both count 0
    trials = []
    for study, count in zip((first, second), seen, strict=True):
        study.sampler = _sampler(optuna, 0, count)
        trials.append(study.ask())
    draws = [trial.suggest_float("x", 0.0, 1.0) for trial in trials]
    assert draws[0] == draws[1]  # the race is real: the same seed, the same candidate
    _check_not_raced(trials[0], seen[0])
    with pytest.raises(_Duplicate, match="another worker"):
        _check_not_raced(trials[1], seen[1])
    third = second.ask()
    _check_not_raced(third, len(second.get_trials()) - 1)  # counted after the others: not a race
