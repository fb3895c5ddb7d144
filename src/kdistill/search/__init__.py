"""How small can the student be? A student search under a budget, with Optuna underneath.

``distill(teacher, "auto", train, val=..., budget={...}, search={...})`` and ``kdistill search CONFIG.yaml`` come
here. :func:`search_and_distill` prepares the run once (splits, the teacher's outputs on the training rows, through
the cache when there is one), checks that some candidate can meet the budget, runs the study
(:mod:`kdistill.search.study`: candidates from the registered families of :mod:`kdistill.search.space`, each checked
against the budget before training, short KD runs ranked on validation accuracy, temperature, soft weight and
learning rate tuned in the same study), then trains the chosen student fully through
:func:`kdistill.pipeline.execute`, with its no-teacher baseline, as any run is, and attaches the search (every
trial, the Pareto fronts, the one-line answer) to the report. docs/search.md has the walk-through.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kdistill.config import SearchSections
from kdistill.errors import ConfigError, KdistillError, StudentError
from kdistill.pipeline import RunSpec, execute, prepare
from kdistill.result import DistillResult
from kdistill.search.budget import Cost, measure_cost, over_budget
from kdistill.search.result import COST_AXES, SearchResult, pareto_front, trial_record
from kdistill.search.space import SEARCH_SPACES, CandidateSpace, CnnSpace, MlpSpace, register_space
from kdistill.search.study import (
    Problem,
    check_families,
    family_shape,
    open_storage,
    run_study,
    short_epochs,
    short_settings,
)
from kdistill.students import STUDENTS

__all__ = [
    "COST_AXES",
    "SEARCH_SPACES",
    "CandidateSpace",
    "CnnSpace",
    "Cost",
    "MlpSpace",
    "SearchResult",
    "pareto_front",
    "register_space",
    "search_and_distill",
    "search_config",
    "search_config_only",
    "search_student",
    "smallest_candidate",
    "trial_record",
]

STORAGE_FILE = Path("search") / "study.journal"
TRIALS_FILE = Path("search") / "trials.json"


def _check_spec(spec: RunSpec) -> None:
    """What a search needs from the run, refused before anything runs."""
    if spec.val is None:
        raise ConfigError(
            "a student search ranks its candidates on validation accuracy, but no validation set was given",
            hint="pass val=(X_val, y_val) (in a config: data.val, or a built-in dataset, which has one).",
        )
    if spec.settings.task != "classification":
        raise ConfigError(
            f"the student search supports task 'classification', got {spec.settings.task!r}",
            hint="search classification students, or choose the student yourself for this task.",
        )
    if spec.student_params:
        raise ConfigError(
            f"student params {sorted(spec.student_params)} were given with student 'auto', which chooses them",
            hint="hold a builder param fixed per family with search={'fixed': {'mlp': {...}}}, or drop it.",
        )
    names = [term.name for term in spec.settings.method]
    if spec.loss is not None or names != ["kd"]:
        raise ConfigError(
            f"the student search tunes kd's temperature and soft weight, but the method is {names}",
            hint="leave method at 'kd' (its ranges are search.temperature and search.soft_weight).",
        )


def _problem(spec: RunSpec, sections: SearchSections) -> tuple[Problem, Any]:
    """The prepared rows and teacher outputs (through the run's cache), as a :class:`Problem`; and the teacher."""
    probe = dataclasses.replace(spec, student="mlp", student_params={})
    prepared = prepare(probe)
    train, val = prepared.splits["train"], prepared.splits["val"]
    assert train is not None and val is not None
    in_shape = tuple(int(size) for size in train.x.shape[1:])
    families = check_families(sections.search, in_shape, prepared.num_classes)
    teacher = prepared.teacher
    search = sections.search
    fingerprint = {
        "data": prepared.data_fingerprint,
        "teacher": None if teacher is None else teacher.fingerprint(),
        "budget": sections.budget.model_dump(mode="json"),
        "families": families,
        "fixed": search.fixed,
        "ranges": {
            "temperature": list(search.temperature),
            "soft_weight": list(search.soft_weight),
            "lr": list(search.lr),
        },
        "short_run": {"epochs": short_epochs(search), "patience": search.patience, "pruner": search.pruner},
        "train": spec.settings.model_dump(mode="json")["train"] | {"seed": spec.settings.seed},
    }
    problem = Problem(
        train=train,
        targets=prepared.targets,
        val=val,
        teacher=teacher,
        num_classes=prepared.num_classes,
        in_shape=in_shape,
        settings=spec.settings,
        budget=sections.budget,
        search=search,
        families=families,
        fingerprint=json.loads(json.dumps(fingerprint)),
        verbose=spec.verbose,
    )
    return problem, teacher


def smallest_candidate(problem: Problem) -> tuple[str, dict[str, Any], Cost]:
    """The cheapest candidate of the searched families: fewest parameters (then bytes) over every candidate of
    every space; its latency measured with the budget's threads. With a latency limit, each family's smallest
    candidate is timed and the fastest of them is returned (timing every candidate would cost more than the search)."""
    from kdistill.profile import count_parameters, model_size_bytes
    from kdistill.search.study import build_candidate

    best: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for family in problem.families:
        shape = family_shape(problem.in_shape, problem.search.fixed, family)
        fixed = dict(problem.search.fixed.get(family, {}))
        fixed.pop("in_shape", None)
        factory = STUDENTS.get(family).factory
        for params in SEARCH_SPACES[family].grid(shape, problem.num_classes):
            try:
                module = factory(list(shape), problem.num_classes, **fixed, **params)
            except (StudentError, ValueError, RuntimeError):
                continue
            key = (count_parameters(module), model_size_bytes(module), params)
            if family not in best or key[:2] < best[family][:2]:
                best[family] = key
    if not best:
        raise StudentError("no candidate of the searched families could be built", hint=str(problem.families))
    timed = []
    for family, (_, _, params) in best.items():
        module, _ = build_candidate(problem, family, params)
        timed.append((family, params, measure_cost(module, problem.train.x, problem.budget, latency=True)))
    if problem.budget.max_latency_ms is not None:
        return min(timed, key=lambda item: (item[2].latency_ms or float("inf"), item[2].parameters))
    return min(timed, key=lambda item: (item[2].parameters, item[2].size_bytes))


def _check_feasible(problem: Problem) -> None:
    """A budget no candidate meets is an error naming the smallest candidate and its size."""
    family, params, cost = smallest_candidate(problem)
    broken = over_budget(cost, problem.budget)
    if broken:
        shown = ", ".join(f"{name}={value}" for name, value in params.items())
        raise ConfigError(
            f"no candidate student fits the budget {problem.budget.model_dump(exclude_none=True)}: the smallest, "
            f"{family}({shown}), has {cost.describe()} ({'; '.join(broken)})",
            hint="raise the budget to at least the smallest candidate's size, or register a space with smaller "
            "candidates (kdistill.search.register_space).",
        )


def search_student(spec: RunSpec, sections: SearchSections) -> tuple[SearchResult, Problem]:
    """Run the search alone (no full training): returns the result and the prepared problem. ``spec`` is the run
    (its ``student`` is ignored); with a run folder the study lives in ``<out>/search/study.journal`` unless
    ``search.storage`` says otherwise, and every trial is written to ``<out>/search/trials.json``."""
    from kdistill.search.study import optuna_module

    optuna_module()  # a missing extra, a bad storage fail before the teacher runs
    _check_spec(spec)
    default = None if spec.out is None else spec.out / STORAGE_FILE
    if default is not None and sections.search.storage is None and not spec.resume and _has_content(default):
        raise ConfigError(
            f"the run folder {spec.out} already holds a search ({default})",
            hint="pass --resume (resume=True) to continue it, or choose another folder (--set out=PATH, out=).",
        )
    storage, description = open_storage(sections.search.storage, default)
    problem, _ = _problem(spec, sections)
    _check_feasible(problem)
    trained = run_study(problem, storage, description)
    result = SearchResult.from_trials(
        trained.trials,
        budget=sections.budget.model_dump(mode="json"),
        search=sections.search.model_dump(mode="json") | {"epochs": short_epochs(sections.search)},
        storage=description,
        wall_time_s=trained.wall_time_s,
    )
    if spec.out is not None:
        result.save(spec.out / TRIALS_FILE)
    return result, problem


def _has_content(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def final_spec(spec: RunSpec, problem: Problem, chosen: dict[str, Any], teacher: Any) -> RunSpec:
    """The run that trains the chosen student fully: its family and params, the tuned temperature, soft weight and
    learning rate, the run's own epochs and patience; the teacher the search already built."""
    knobs = {name: float(chosen[name]) for name in ("temperature", "soft_weight", "lr")}
    settings = short_settings(spec.settings, knobs, spec.settings.train.epochs, spec.settings.train.patience)
    student = dict(chosen["student"])
    family = student.pop("kind")
    student.pop("num_classes", None)
    if "in_shape" not in problem.search.fixed.get(family, {}):
        student.pop("in_shape", None)
    resume = spec.resume and spec.out is not None and (spec.out / "config.json").is_file()
    return dataclasses.replace(
        spec,
        settings=settings,
        student=family,
        student_params=student,
        teacher=teacher if teacher is not None else spec.teacher,
        teacher_factory=None if teacher is not None else spec.teacher_factory,
        resume=resume,
        identity=spec.identity | {"searched_student": chosen["student"]},
        report_settings=spec.report_settings
        | {
            "student": family,
            "searched": True,
            "temperature": knobs["temperature"],
            "soft_weight": knobs["soft_weight"],
        },
    )


def search_and_distill(
    spec: RunSpec, sections: SearchSections, *, config_dump: dict[str, Any] | None = None
) -> DistillResult:
    """Search (:func:`search_student`), then train the chosen student fully and report it with its baseline. The
    report's ``search`` holds the search (:meth:`SearchResult.to_dict`); with a run folder, ``report.json`` and
    ``search/trials.json`` are written there."""
    result, problem = search_student(spec, sections)
    if result.chosen is None:
        raise KdistillError(
            f"the search finished no candidate inside the budget: {result.line()}",
            hint="give it more trials or time (search.trials, search.timeout_s), or a looser pruner.",
        )
    final = final_spec(spec, problem, result.chosen, problem.teacher)
    distilled = execute(final, config_dump=config_dump)
    assert distilled is not None, "a search runs in one process; torchrun ranks are not supported"
    report = distilled.report
    if report is not None:
        models = report.models
        result.final = {
            "split": report.split,
            "student_accuracy": models["student"].get("accuracy"),
            "baseline_accuracy": models.get("baseline", {}).get("accuracy"),
            "teacher_accuracy": models.get("teacher", {}).get("accuracy"),
            "parameters": models["student"].get("parameters"),
            "size_bytes": models["student"].get("size_bytes"),
        }
        report.search = result.to_dict()
        if spec.out is not None:
            report.save(spec.out / "report.json")
    if spec.out is not None:
        result.save(spec.out / TRIALS_FILE)
    return distilled


def _sections(config: Any) -> SearchSections:
    return SearchSections(
        budget=config.budget if config.budget is not None else SearchSections().budget,
        search=config.search if config.search is not None else SearchSections().search,
    )


def search_config_only(config: Any, *, verbose: bool = True) -> SearchResult:
    """``kdistill search CONFIG.yaml --search-only``: the search alone, one worker of a shared study (see
    docs/search.md: several of these on one journal file, then one ``kdistill search --resume`` trains the
    chosen student)."""
    from kdistill.config import RunConfig, check_references
    from kdistill.run import run_spec

    assert isinstance(config, RunConfig)
    check_references(config)
    spec = dataclasses.replace(run_spec(config, verbose=verbose), student="auto", student_params={})
    return search_student(spec, _sections(config))[0]


def search_config(
    config: Any, *, resume: bool = False, verbose: bool = True, html: bool = True
) -> tuple[DistillResult, SearchResult]:
    """``kdistill search CONFIG.yaml``: the config's run (data, teacher, method settings) with its ``budget`` and
    ``search`` sections; the ``student`` section is not read. Writes the run folder as ``kdistill run`` does, plus
    ``search/study.journal``, ``search/trials.json`` and (``html``, with matplotlib) ``report.html``. ``resume``
    continues a killed search (and then its final run) in the same folder."""
    from kdistill.config import RunConfig, check_references
    from kdistill.run import run_spec

    assert isinstance(config, RunConfig)
    check_references(config)
    sections = _sections(config)
    spec = dataclasses.replace(run_spec(config, resume=resume, verbose=verbose), student="auto", student_params={})
    distilled = search_and_distill(spec, sections, config_dump=config.model_dump(mode="json"))
    assert distilled.report is not None and distilled.report.search, "a config run always reports"
    found = distilled.report.search
    result = SearchResult(
        trials=found["trials"],
        chosen=found["chosen"],
        budget=found["budget"],
        search=found["search"],
        storage=found["storage"],
        wall_time_s=found["wall_time_s"],
        final=found["final"],
    )
    if html:
        import contextlib

        from kdistill.errors import DependencyError
        from kdistill.report_html import write_html_report_from_folder

        with contextlib.suppress(DependencyError):  # matplotlib is the "report" extra
            write_html_report_from_folder(config.run_folder)
    return distilled, result
