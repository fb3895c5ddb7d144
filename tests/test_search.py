"""The student search (kdistill.search): budget checks before training, the tuned knobs, repeatability, pruning on
the epoch callback, the Pareto fronts, pluggable spaces, the HTML section and every bad input."""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.engine import TrainConfig, TransferSet, fit
from kdistill.errors import ConfigError, DependencyError
from kdistill.losses import get_loss
from kdistill.profile import count_parameters
from kdistill.search import SEARCH_SPACES, pareto_front, register_space
from kdistill.search.study import _ReportToPruner
from kdistill.students import STUDENTS, register_student, student_from_spec

Data = dict[str, tuple[np.ndarray, np.ndarray]]
QUICK = {"epochs": 2, "patience": None, "pruner": "none"}


def _search(forest: Any, digits: Data, budget: dict[str, Any], search: dict[str, Any], **kwargs: Any) -> Any:
    return kdistill.distill(
        forest,
        "auto",
        digits["train"],
        val=digits["val"],
        test=digits["test"],
        epochs=3,
        verbose=False,
        profile=False,
        budget=budget,
        search=QUICK | search,
        **kwargs,
    )


def _mlp_params(in_features: int, hidden: list[int], classes: int) -> int:
    """Weights and biases of an MLP, counted by hand: sum over layers of (fan_in + 1) * fan_out."""
    widths = [in_features, *hidden, classes]
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in itertools.pairwise(widths))


def test_candidates_over_budget_are_refused_before_training_and_the_chosen_one_is_trained_fully(
    forest: Any, digits: Data
) -> None:
    result = _search(forest, digits, {"max_params": 1200}, {"trials": 3, "families": ["mlp"], "warm_start": False})
    found = result.report.search
    trials = found["trials"]
    over = [t for t in trials if t["state"] == "over_budget"]
    trained = [t for t in trials if t["state"] == "complete"]
    assert over, "a 1,200-parameter budget over MLPs of up to 3x256 units refuses some draws"
    assert len(trained) == 3  # over-budget draws are not counted as trials
    for record in trials:
        hidden = record["student"]["hidden"]
        assert record["parameters"] == _mlp_params(64, hidden, 10)  # computed, checked by hand
        assert record["parameters"] == count_parameters(student_from_spec(record["student"]))
    for record in over:
        assert record["parameters"] > 1200 and record["epochs_run"] == 0 and record["val_accuracy"] is None
        assert "max_params 1,200" in record["over_budget"][0]
        assert record["latency_ms"] is None  # not timed: already over the size limit
    for record in trained:
        assert record["parameters"] <= 1200 and record["epochs_run"] == 2 and record["latency_ms"] > 0
    chosen = found["chosen"]
    assert chosen["val_accuracy"] == max(t["val_accuracy"] for t in trained)
    # the chosen student is the one trained fully (3 epochs here), with its baseline, as any run is
    assert count_parameters(result.student) == chosen["parameters"]
    assert result.report.models["student"]["parameters"] == chosen["parameters"]
    assert "baseline" in result.report.models and len(result.history) == 3
    assert found["final"]["student_accuracy"] == result.report.models["student"]["accuracy"]
    answer = found["answer"]
    assert answer.startswith(f"chosen student: {chosen['label']}") and f"{chosen['parameters']:,} params" in answer
    assert f"trial {chosen['number']}" in answer


def test_a_search_is_repeatable_and_tunes_the_temperature_soft_weight_and_lr_in_the_same_study(
    forest: Any, digits: Data
) -> None:
    settings = {
        "trials": 3,
        "temperature": [1.5, 6.0],
        "soft_weight": [0.2, 0.8],
        "lr": [0.002, 0.05],
        "warm_start": False,
    }
    first = _search(forest, digits, {"max_params": 20_000}, settings, seed=3, baseline=False).report.search
    second = _search(forest, digits, {"max_params": 20_000}, settings, seed=3, baseline=False).report.search
    keys = ("params", "val_accuracy", "parameters", "state")
    assert [[t[k] for k in keys] for t in first["trials"]] == [[t[k] for k in keys] for t in second["trials"]]
    trials = first["trials"]
    assert len({t["temperature"] for t in trials}) == len(trials)  # drawn per trial, not fixed
    for record in trials:
        assert 1.5 <= record["temperature"] <= 6.0 and 0.2 <= record["soft_weight"] <= 0.8
        assert 0.002 <= record["lr"] <= 0.05
        assert {"family", "temperature", "soft_weight", "lr"} <= set(record["params"])  # one study, one trial
    other = _search(forest, digits, {"max_params": 20_000}, settings, seed=4, baseline=False).report.search
    assert [t["params"] for t in other["trials"]] != [t["params"] for t in trials]


class _PruneAt:
    """A stand-in for an Optuna trial whose pruner says stop once epoch ``epoch`` was reported."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.reported = epoch, []  # type: ignore[var-annotated]

    def report(self, value: float, step: int) -> None:
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return self.reported[-1][0] >= self.epoch


def test_a_new_search_starts_at_the_runs_own_settings_with_the_widest_shape_of_each_depth(
    forest: Any, digits: Data
) -> None:
    found = _search(
        forest,
        digits,
        {"max_params": 5000},
        {"trials": 3, "temperature": [1.0, 4.0], "lr": [0.001, 0.1], "families": ["mlp"]},
        baseline=False,
        lr=0.004,
        temperature=2.5,
        soft_weight=0.7,
    ).report.search
    warm = [t for t in found["trials"] if t["warm_start"]]
    # widest of each depth inside 5,000, counted by hand: [64] 4,810 ([128] 9,610 is over); [32, 16, 8] 2,834
    # ([64, 32, 16] 6,938 is over); [32, 16] 2,778 ([64, 32] 6,570 is over); the most parameters first
    assert [t["student"]["hidden"] for t in warm] == [[64], [32, 16, 8], [32, 16]]
    assert [t["parameters"] for t in warm] == [_mlp_params(64, h, 10) for h in ([64], [32, 16, 8], [32, 16])]
    for record in warm:
        wider = [2 * width for width in record["student"]["hidden"]]
        assert _mlp_params(64, wider, 10) > 5000  # the next rung of its ladder breaks the budget
    # the first trial (and every warm start) runs at the run's own T, soft weight and lr, not mid-range ones
    first = found["trials"][0]
    assert first["number"] == 0 and first["warm_start"]
    for record in warm:
        assert (record["temperature"], record["soft_weight"], record["lr"]) == (2.5, 0.7, 0.004)


def test_at_a_tiny_budget_the_warm_start_holds_the_shapes_that_fill_it(forest: Any, digits: Data) -> None:
    from kdistill.students import STUDENTS

    def cnn_params(channels: list[int]) -> int:
        return count_parameters(STUDENTS.get("cnn").factory([1, 8, 8], 10, channels=channels, kernel_size=5))

    budget = 800
    settings = {"trials": 5, "epochs": 1, "families": ["mlp", "cnn"], "fixed": {"cnn": {"in_shape": [1, 8, 8]}}}
    found = _search(forest, digits, {"max_params": budget}, settings, baseline=False).report.search
    warm = [t for t in found["trials"] if t["warm_start"]]
    assert len(warm) == 5 and all(t["state"] == "complete" for t in warm)
    cnns = {len(t["student"]["channels"]): t["student"]["channels"] for t in warm if t["family"] == "cnn"}
    # one per depth, each the widest of equal blocks inside 800 params (doubling it breaks the budget): [16] 618,
    # [4, 4] 574, [2, 2, 2] 298; the old warm start tried only the three-block one, the smallest of them
    assert cnns == {1: [16], 2: [4, 4], 3: [2, 2, 2]}
    for channels in cnns.values():
        assert cnn_params(channels) <= budget < cnn_params([2 * c for c in channels])
    mlps = [t["student"]["hidden"] for t in warm if t["family"] == "mlp"]
    # by hand: [8] 610 ([16] 1,210 is over), [8, 4] 606; the narrowest three-layer one, [16, 8, 4], has 1,262
    assert mlps == [[8], [8, 4]] and _mlp_params(64, [16, 8, 4], 10) > budget
    assert [t["parameters"] for t in warm] == sorted((t["parameters"] for t in warm), reverse=True)
    # with a compute budget too small for all five, the search stops and the rest wait, named in the records
    short = _search(forest, digits, {"max_params": budget}, settings | {"max_epochs": 2}, baseline=False)
    states = [t["state"] for t in short.report.search["trials"]]
    assert states[:2] == ["complete", "complete"] and set(states[2:]) == {"queued"}
    assert {t["family"] for t in short.report.search["trials"][2:]} <= {"mlp", "cnn"}


def test_the_short_run_length_is_chosen_from_the_compute_budget(forest: Any, digits: Data) -> None:
    from kdistill.config import SearchConfig
    from kdistill.search.study import short_epochs

    assert short_epochs(SearchConfig(max_epochs=60)) == 10  # about six full short runs
    assert short_epochs(SearchConfig(max_epochs=12)) == 4  # never shorter than 4 epochs
    assert short_epochs(SearchConfig(max_epochs=1000)) == 30  # nor longer than 30
    assert short_epochs(SearchConfig()) == 30  # no compute budget: 30
    assert short_epochs(SearchConfig(epochs=7, max_epochs=60)) == 7  # a given length wins
    settings = {"trials": 100, "max_epochs": 24, "epochs": None, "patience": None, "families": ["mlp"]}
    found = _search(forest, digits, {"max_params": 5000}, settings, baseline=False).report.search
    assert found["search"]["epochs"] == 4
    ran = [t["epochs_run"] for t in found["trials"] if t["state"] == "complete"]
    assert ran and set(ran) == {4} and found["epochs_trained"] == 24 and len(ran) == 6


def test_the_pruner_is_asked_after_every_epoch_and_stops_the_run(digits: Data) -> None:
    x = torch.as_tensor(digits["train"][0], dtype=torch.float32)
    y = torch.as_tensor(digits["train"][1])
    val = (torch.as_tensor(digits["val"][0], dtype=torch.float32), torch.as_tensor(digits["val"][1]))
    trial = _PruneAt(epoch=2)
    callback = _ReportToPruner(trial)
    model = nn.Sequential(nn.Linear(64, 10))
    state = fit(
        model,
        get_loss("ce"),
        TransferSet(x, y, None),
        val=val,
        config=TrainConfig(epochs=8, verbose=False),
        callbacks=[callback],
    )
    assert len(state.history) == 3 and callback.pruned_at == 2
    assert [step for step, _ in trial.reported] == [0, 1, 2]
    assert [value for _, value in trial.reported] == [epoch["val_accuracy"] for epoch in state.history]


def test_median_pruning_stops_weak_trials_in_a_real_study(forest: Any, digits: Data) -> None:
    found = _search(
        forest, digits, {"max_params": 50_000}, {"trials": 8, "epochs": 4, "pruner": "median"}, baseline=False
    ).report.search
    states = [t["state"] for t in found["trials"]]
    pruned = [t for t in found["trials"] if t["state"] == "pruned"]
    assert pruned, states
    assert all(t["epochs_run"] < 4 for t in pruned)
    assert found["counts"]["complete"] + found["counts"]["pruned"] == 8


def _dominated(record: dict[str, Any], others: list[dict[str, Any]], cost: str) -> bool:
    return any(
        o["val_accuracy"] >= record["val_accuracy"]
        and o[cost] <= record[cost]
        and (o["val_accuracy"] > record["val_accuracy"] or o[cost] < record[cost])
        for o in others
    )


def test_the_pareto_front_is_the_set_of_non_dominated_trials() -> None:
    generator = np.random.default_rng(0)
    records = [
        {
            "number": number,
            "state": "complete" if number % 5 else "pruned",
            "val_accuracy": float(generator.integers(0, 8)) / 8,
            "parameters": int(generator.integers(1, 12)),
        }
        for number in range(40)
    ]
    done = [r for r in records if r["state"] == "complete"]
    expected = {r["number"] for r in done if not _dominated(r, done, "parameters")}
    # equal (cost, accuracy) twins: the first is kept, so drop later twins from the brute-force set too
    twins = {(r["parameters"], r["val_accuracy"]) for r in done if r["number"] in expected}
    firsts = {min(r["number"] for r in done if (r["parameters"], r["val_accuracy"]) == twin) for twin in twins}
    front = pareto_front(records, "parameters")
    assert set(front) == firsts
    assert [next(r for r in records if r["number"] == n)["parameters"] for n in front] == sorted(
        next(r for r in records if r["number"] == n)["parameters"] for n in front
    )


def test_a_new_family_joins_the_search_with_one_space(forest: Any, digits: Data) -> None:
    @register_student("linear_probe", "one linear layer (a test family)")
    def linear_probe(in_shape: Any, num_classes: int, *, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes, bias=bias))

    class LinearSpace:
        family = "linear_probe"
        description = "a linear layer with or without bias"

        def fits(self, in_shape: Any, num_classes: int) -> bool:
            return True

        def suggest(self, trial: Any, in_shape: Any, num_classes: int) -> dict[str, Any]:
            return {"bias": bool(trial.suggest_int("linear_probe.bias", 0, 1))}

        def grid(self, in_shape: Any, num_classes: int) -> list[dict[str, Any]]:
            return [{"bias": False}, {"bias": True}]

    register_space(LinearSpace())
    try:
        result = _search(forest, digits, {"max_params": 640}, {"trials": 2, "families": ["linear_probe"]})
        found = result.report.search
        assert {t["family"] for t in found["trials"]} == {"linear_probe"}
        # 650 params with a bias, 640 without: only bias=False fits, and it is what was trained
        assert all(t["student"]["bias"] is False for t in found["trials"] if t["state"] == "complete")
        assert count_parameters(result.student) == 640
    finally:
        del SEARCH_SPACES["linear_probe"]
        del STUDENTS["linear_probe"]


def test_the_html_report_shows_the_pareto_table_and_plot(forest: Any, digits: Data) -> None:
    pytest.importorskip("matplotlib")
    from kdistill.report_html import render_html

    result = _search(forest, digits, {"max_params": 5000}, {"trials": 2}, baseline=False)
    page = render_html(result.report)
    assert "<table id='pareto'>" in page and "alt='Pareto fronts'" in page
    chosen = result.report.search["chosen"]
    assert f"<td>{chosen['number']} (chosen)</td>" in page
    assert result.report.search["answer"] in page.replace("&#x27;", "'")


# ---------------------------------------------------------------------------------------------------- bad input


def test_a_budget_nothing_meets_names_the_smallest_candidate(forest: Any, digits: Data) -> None:
    with pytest.raises(ConfigError) as caught:
        _search(forest, digits, {"max_params": 100}, {"families": ["mlp"]})
    message = str(caught.value)
    smallest = _mlp_params(64, [4], 10)  # one hidden layer of 4 units: 310
    assert "no candidate student fits the budget" in message and "mlp(hidden=[4])" in message
    assert f"{smallest:,} params" in message and "max_params 100" in message


def test_unknown_budget_and_search_keys_name_the_closest(forest: Any, digits: Data) -> None:
    with pytest.raises(ConfigError, match=r"budget\.max_param: unknown key; did you mean 'max_params'\?"):
        _search(forest, digits, {"max_param": 5000}, {})
    with pytest.raises(ConfigError, match=r"search\.trails: unknown key; did you mean 'trials'\?"):
        _search(forest, digits, {}, {"trails": 3})
    with pytest.raises(ConfigError, match=r"unknown search family 'mpl'; did you mean 'mlp'\?"):
        _search(forest, digits, {}, {"families": ["mpl"]})
    with pytest.raises(ConfigError, match=r"search\.fixed: unknown param for student 'cnn': 'in_shap'; did you"):
        _search(forest, digits, {}, {"fixed": {"cnn": {"in_shap": [1, 8, 8]}}})
    with pytest.raises(ConfigError, match=r"student params \['hidden'\] were given with student 'auto'"):
        _search(forest, digits, {}, {}, hidden=[8])
    with pytest.raises(ConfigError, match="budget= and search= are for student='auto'"):
        kdistill.distill(forest, "mlp", digits["train"], budget={"max_params": 10}, verbose=False)


def test_a_search_without_a_validation_set_is_refused(forest: Any, digits: Data) -> None:
    with pytest.raises(ConfigError, match="no validation set was given"):
        kdistill.distill(forest, "auto", digits["train"], test=digits["test"], budget={"max_params": 5000})


def test_a_storage_that_cannot_be_opened_is_a_clear_error(forest: Any, digits: Data, tmp_path: Any) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be opened as a journal file"):
        _search(forest, digits, {}, {"storage": str(blocker / "study.journal")})
    with pytest.raises(ConfigError, match=r"search\.storage 'postgresql://nobody@127\.0\.0\.1:1/x' cannot be opened"):
        _search(forest, digits, {}, {"storage": "postgresql://nobody@127.0.0.1:1/x"})


def test_without_optuna_the_error_names_the_extra(forest: Any, digits: Data, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(DependencyError, match=r"kdistill\[search\]"):
        _search(forest, digits, {"max_params": 5000}, {})


def test_an_rdb_url_is_accepted(forest: Any, digits: Data, tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    found = _search(forest, digits, {"max_params": 5000}, {"trials": 1, "storage": url}, baseline=False).report.search
    assert found["storage"] == url and found["counts"]["complete"] == 1
    import optuna

    study = optuna.load_study(study_name="kdistill-search", storage=url)
    assert [t.number for t in study.trials] == [t["number"] for t in found["trials"]]


def test_max_epochs_is_a_compute_budget_for_the_short_runs(forest: Any, digits: Data) -> None:
    found = _search(
        forest, digits, {"max_params": 5000}, {"trials": 100, "max_epochs": 5, "families": ["mlp"]}, baseline=False
    ).report.search
    # 2-epoch runs: after two (4 epochs) a third starts under the limit and finishes; then the search stops
    assert found["epochs_trained"] == 6 and found["counts"]["complete"] == 3


def test_latency_is_measured_on_the_budget_threads_and_checked(forest: Any, digits: Data) -> None:
    with pytest.raises(ConfigError, match=r"ms > max_latency_ms 1e-06 \(batch 1, 1 thread\(s\)\)"):
        _search(forest, digits, {"max_latency_ms": 1e-6, "threads": 1}, {"families": ["mlp"]})
    found = _search(
        forest, digits, {"max_latency_ms": 50.0, "threads": 1}, {"trials": 2, "families": ["mlp"]}, baseline=False
    ).report.search
    assert all(0 < t["latency_ms"] <= 50.0 for t in found["trials"] if t["state"] == "complete")
    assert "ms at batch 1" in found["answer"]


def test_a_run_folder_holding_a_search_needs_resume(forest: Any, digits: Data, tmp_path: Any) -> None:
    settings = {"trials": 1, "families": ["mlp"]}
    first = _search(forest, digits, {"max_params": 3000}, settings, baseline=False, out=tmp_path / "run")
    assert (tmp_path / "run" / "search" / "study.journal").stat().st_size > 0
    assert (tmp_path / "run" / "search" / "trials.json").is_file()
    with pytest.raises(ConfigError, match="already holds a search"):
        _search(forest, digits, {"max_params": 3000}, settings, baseline=False, out=tmp_path / "run")
    again = _search(forest, digits, {"max_params": 3000}, settings, baseline=False, out=tmp_path / "run", resume=True)
    assert again.report.search["trials"] == first.report.search["trials"]  # nothing drawn again: the study was done


def test_the_pruner_setting_picks_optunas_pruner_sized_to_the_short_run() -> None:
    import optuna

    from kdistill.config import SearchConfig
    from kdistill.search.study import _pruner

    hyperband = _pruner(optuna, SearchConfig(pruner="hyperband", epochs=12))
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner) and hyperband._max_resource == 12
    assert isinstance(_pruner(optuna, SearchConfig(pruner="median")), optuna.pruners.MedianPruner)
    assert isinstance(_pruner(optuna, SearchConfig(pruner="none")), optuna.pruners.NopPruner)


def test_of_two_queued_warm_starts_only_the_first_trains() -> None:
    import optuna

    from kdistill.search.study import _check_not_a_twin, _Duplicate

    study = optuna.create_study(direction="maximize")
    for _ in range(2):  # two workers that both saw the shared study empty
        study.enqueue_trial({"family": "mlp"}, user_attrs={"warm_start": True})
    first, second = study.ask(), study.ask()
    _check_not_a_twin(study, first)
    with pytest.raises(_Duplicate, match="a duplicate of warm-start trial 0"):
        _check_not_a_twin(study, second)
    third = study.ask()  # a drawn trial is never a twin
    _check_not_a_twin(study, third)


def test_kdistill_run_refuses_a_config_with_a_search_section() -> None:
    from pathlib import Path

    from kdistill.config import load_config
    from kdistill.run import run

    config = load_config(Path(__file__).parents[1] / "examples" / "digits_search.yaml")
    with pytest.raises(ConfigError, match=r"only a student search reads(.|\n)*kdistill search CONFIG.yaml"):
        run(config, verbose=False)


def test_a_trial_killed_between_ask_and_its_tag_is_recovered_on_resume(monkeypatch: Any) -> None:
    import optuna

    from kdistill.search import study as study_module

    monkeypatch.setattr(study_module, "_UNTAGGED_GRACE_S", 0.2)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"family": "mlp", "mlp.depth": 1}, user_attrs={"warm_start": True})
    untagged = study.ask()  # its process died before tagging it: no "worker"
    mine = study.ask()
    mine.set_user_attr("worker", study_module._worker())  # this live process's own trial
    assert study_module._recover_stale(optuna, study) == 1
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[untagged.number] == "FAIL" and states[mine.number] == "RUNNING"
    rerun = next(t for t in study.get_trials() if t.user_attrs.get("rerun_of") == untagged.number)
    # queued again with what it was queued with, not as a warm start (which would read as its own duplicate)
    assert rerun.system_attrs["fixed_params"] == {"family": "mlp", "mlp.depth": 1}
    assert not rerun.user_attrs.get("warm_start")
