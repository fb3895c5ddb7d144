"""The Optuna study behind a student search: storage, sampler, pruner, the objective, resume and sharing.

One trial = one candidate student (family and architecture from :mod:`kdistill.search.space`) with a temperature,
a soft weight and a learning rate, all drawn by a seeded TPE sampler in the same study:

    draw -> build the student -> cost (params and bytes computed, batch-1 latency measured on the budget's thread
    count) -> over budget? recorded with its overshoot as TPE's constraint, not trained, not counted
           -> else a short KD run (engine ``fit``), the validation accuracy reported after every epoch to the pruner
              (median or Hyperband), which may stop it; the trial's value is its best validation accuracy

Storage: a journal file (``optuna.storages.JournalStorage`` with its file backend) or an RDB URL. A killed search
resumes where it stopped: finished trials are in the storage and count towards ``trials``; a trial left running by a
dead process on this machine is marked failed and its candidate is drawn again first. Several processes on one
machine share a study through one journal file (each stops once the study holds ``trials`` trained trials).

Repeatability: before each draw the sampler is re-seeded from ``(seed, number of trials in the study)``, so a
search run alone is repeatable draw for draw, and two workers sharing a study do not repeat each other's random
start-up draws.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.config import BudgetConfig, MethodTerm, SearchConfig, Settings
from kdistill.data import Split
from kdistill.engine import EarlyStopping, TrainState, TransferSet, fit
from kdistill.engine.callbacks import Callback
from kdistill.errors import CheckpointError, ConfigError, DependencyError, KdistillError, NonFiniteLossError
from kdistill.pipeline import build_loss, train_config
from kdistill.search.budget import Cost, excess, measure_cost, over_budget
from kdistill.search.space import SEARCH_SPACES
from kdistill.students import STUDENTS, build_student
from kdistill.teachers import Teacher

__all__ = [
    "Problem",
    "Trained",
    "build_candidate",
    "candidate_cost",
    "check_families",
    "family_shape",
    "open_storage",
    "optuna_module",
    "run_knobs",
    "run_study",
    "short_epochs",
    "short_settings",
    "warm_start_candidates",
]

_MAX_DRAWS_PER_TRIAL = 25
"""A search stops after ``25 * trials`` draws even if too few were inside the budget (a budget most candidates
miss); the answer then says how many were trained."""


_AUTO_SHORT_RUNS = 6
"""With ``search.epochs`` left out and a compute budget (``max_epochs``), each short run is ``max_epochs / 6`` epochs
(4 to 30): the budget buys about six full short runs, more when the pruner stops weak ones, so a small budget still
tries several shapes instead of two or three long runs."""
_SHORT_EPOCHS = (4, 30)


def short_epochs(search: SearchConfig) -> int:
    """The length of each short run: ``search.epochs`` when given; else chosen from the compute budget
    (``max_epochs // 6``, clipped to 4-30); else 30."""
    if search.epochs is not None:
        return search.epochs
    low, high = _SHORT_EPOCHS
    if search.max_epochs is None:
        return high
    return min(high, max(low, search.max_epochs // _AUTO_SHORT_RUNS))


def optuna_module() -> Any:
    """``import optuna``, or a :class:`DependencyError` naming the extra that brings it."""
    try:
        import optuna
    except ImportError as exc:
        raise DependencyError(
            f"the student search needs optuna, which is not installed ({exc})",
            hint="pip install 'kdistill[search]'",
        ) from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Problem:
    """What a search needs, prepared once: the training rows and the teacher's outputs on them, the validation rows,
    the number of classes, the row shape the students read, the run's settings (optimizer, batch size, seed, device),
    the budget and the search settings; ``families``: the spaces to draw from (checked to fit the data);
    ``fingerprint``: what a resumed or shared study must match (data, teacher, budget, spaces, ranges)."""

    train: Split
    targets: torch.Tensor | None
    val: Split
    teacher: Teacher | None
    num_classes: int
    in_shape: tuple[int, ...]
    settings: Settings
    budget: BudgetConfig
    search: SearchConfig
    families: list[str]
    fingerprint: dict[str, Any]
    verbose: bool = False
    _costs: dict[str, Cost] = field(default_factory=dict)


@dataclass(frozen=True)
class Trained:
    """The study after this process's work: every trial (Optuna's frozen trials) and this process's wall time."""

    trials: list[Any]
    wall_time_s: float
    storage: str


# ---------------------------------------------------------------------------------------------------- storage


def open_storage(storage: str | None, default: Path | None) -> tuple[Any, str]:
    """The Optuna storage for ``storage`` and its description: an RDB URL (``postgresql://``, ``mysql://``,
    ``sqlite:///``; anything with ``://``) or a journal file path; None falls back to ``default`` (a journal file in
    the run folder) or, without one, to memory. A storage that cannot be opened is a :class:`ConfigError`."""
    optuna = optuna_module()
    target = storage if storage is not None else (None if default is None else str(default))
    if target is None:
        return None, "memory"
    if "://" in target:
        try:
            return optuna.storages.RDBStorage(target), target
        except Exception as exc:  # sqlalchemy's errors (bad URL, missing driver, unreachable server) have no base
            raise ConfigError(
                f"search.storage {target!r} cannot be opened: {type(exc).__name__}: {exc}",
                hint="check the URL, that its database driver is installed and that the server is reachable; for "
                "processes on one machine a journal file path needs no server.",
            ) from exc
    path = Path(target).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.journal.JournalStorage(backend), str(path)
    except OSError as exc:
        raise ConfigError(
            f"search.storage {target!r} cannot be opened as a journal file: {exc}",
            hint="give a file path in a folder you can write (it is created), or an RDB URL such as "
            "postgresql://user@host/db.",
        ) from exc


def _pruner(optuna: Any, search: SearchConfig) -> Any:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=short_epochs(search), reduction_factor=3)
    return optuna.pruners.NopPruner()


def _constraint(trial: Any) -> Sequence[float]:
    """TPE's constraint: the recorded budget overshoot (<= 0 inside the budget)."""
    return [float(trial.user_attrs.get("excess", 0.0))]


def _native_constraints(optuna: Any) -> bool:
    """Optuna 5 records constraints on the trial (``Trial.set_constraint``); Optuna 4 reads a ``constraints_func``."""
    return hasattr(optuna.trial.Trial, "set_constraint")


def _sampler(optuna: Any, seed: int, draws: int) -> Any:
    options = {} if _native_constraints(optuna) else {"constraints_func": _constraint}
    with warnings.catch_warnings():  # multivariate/group/constraints are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=(seed * 1_000_003 + draws) % 2**32, n_startup_trials=5, multivariate=True, group=True, **options
        )


def _open_study(optuna: Any, storage: Any, problem: Problem) -> Any:
    study = optuna.create_study(
        storage=storage,
        study_name=problem.search.study_name,
        direction="maximize",
        pruner=_pruner(optuna, problem.search),
        load_if_exists=True,
    )
    saved = study.user_attrs.get("kdistill")
    if saved is None:
        study.set_user_attr("kdistill", problem.fingerprint)
    elif saved != json.loads(json.dumps(problem.fingerprint)):
        changed = sorted(
            key for key in set(saved) | set(problem.fingerprint) if saved.get(key) != problem.fingerprint.get(key)
        )
        raise CheckpointError(
            f"study {problem.search.study_name!r} in this storage was made for another search (different "
            f"{', '.join(changed)})",
            hint="resume with the original budget, data and search ranges, or set search.study_name to start a new "
            "study in the same storage.",
        )
    return study


# ---------------------------------------------------------------------------------------------------- resume


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_UNTAGGED_GRACE_S = 5.0
"""A live worker tags its trial (``worker``) right after ``study.ask()``, which holds only the sampler's draw; a trial
still untagged this long after it started lost its process between the two."""


def _untagged(optuna: Any, study: Any) -> list[Any]:
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return [trial for trial in running if "worker" not in trial.user_attrs]


def _stale(optuna: Any, study: Any) -> list[Any]:
    """Trials left running by a dead process: tagged with a process of this machine that no longer exists, or never
    tagged (killed between ``ask`` and the tag) though started over ``_UNTAGGED_GRACE_S`` ago."""
    host = socket.gethostname()
    untagged = _untagged(optuna, study)
    if untagged:
        youngest = max(time.time() - trial.datetime_start.timestamp() for trial in untagged if trial.datetime_start)
        time.sleep(max(0.0, _UNTAGGED_GRACE_S - youngest))
        untagged = _untagged(optuna, study)
    stale = list(untagged)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        name, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if name == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.append(trial)
    return stale


def _recover_stale(optuna: Any, study: Any) -> int:
    """Mark trials left running by a dead process (:func:`_stale`) as failed, and queue their candidates (what they
    had drawn, or were queued with) to be drawn again first: what "resume where it stopped" means for the trial that
    was killed. Returns how many."""
    recovered = 0
    for trial in _stale(optuna, study):
        study._storage.set_trial_user_attr(trial._trial_id, "error", "its process died (killed search)")
        study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
        kept = dict(trial.system_attrs.get("fixed_params", {})) | dict(trial.params)
        study.enqueue_trial(kept, user_attrs={"rerun_of": trial.number})
        recovered += 1
    return recovered


def run_knobs(problem: Problem) -> dict[str, float]:
    """The run's own temperature and soft weight (its ``kd`` term's params, else kd's defaults) and learning rate,
    each clipped to its search range: the first point a warm start tries (the settings the user chose, or the
    demo's tuned ones, before anything is drawn)."""
    from kdistill.losses.kd import KDLoss

    params = dict(problem.settings.method[0].params) if problem.settings.method else {}
    kd = KDLoss(**{name: params[name] for name in ("temperature", "soft_weight") if name in params})
    search = problem.search

    def clip(value: float, bounds: tuple[float, float]) -> float:
        return float(min(max(value, bounds[0]), bounds[1]))

    return {
        "temperature": clip(kd.temperature, search.temperature),
        "soft_weight": clip(kd.soft_weight, search.soft_weight),
        "lr": clip(problem.settings.train.optimizer.lr, search.lr),
    }


def warm_start_candidates(problem: Problem) -> list[tuple[str, dict[str, Any], Cost]]:
    """What a new study tries first: for each family with ``seeds`` and ``encode``, the widest rung inside the budget
    of each of its ladders (the widest candidate of each depth that fits), all families together, the most parameters
    first (the one that fills the budget best is trial 0)."""
    picked = []
    for family in problem.families:
        space = SEARCH_SPACES[family]
        seeds, encode = getattr(space, "seeds", None), getattr(space, "encode", None)
        if seeds is None or encode is None:
            continue
        shape = family_shape(problem.in_shape, problem.search.fixed, family)
        for ladder in seeds(shape, problem.num_classes):
            fitting = []
            for params in ladder:
                module, spec = build_candidate(problem, family, params)
                cost = candidate_cost(problem, module, spec)
                if not over_budget(cost, problem.budget):
                    fitting.append((cost.parameters, params, cost))
            if fitting:
                _, params, cost = max(fitting, key=lambda item: item[0])
                picked.append((family, params, cost))
    return sorted(picked, key=lambda item: (-item[2].parameters, -item[2].size_bytes))


def _warm_start(study: Any, problem: Problem) -> int:
    """For a new study: queue :func:`warm_start_candidates`, each at the run's own settings (:func:`run_knobs`).
    Returns how many were queued."""
    if study.get_trials(deepcopy=False):
        return 0
    knobs = run_knobs(problem)
    queued = 0
    for family, params, _ in warm_start_candidates(problem):
        encode = SEARCH_SPACES[family].encode  # type: ignore[attr-defined]
        fixed = {"family": family, **encode(params), **knobs}
        study.enqueue_trial(fixed, user_attrs={"warm_start": True}, skip_if_exists=True)
        queued += 1
    return queued


def _epochs_spent(study: Any) -> int:
    return sum(int(trial.user_attrs.get("epochs_run", 0)) for trial in study.get_trials(deepcopy=False))


def _trained_count(study: Any) -> int:
    return sum(
        1
        for trial in study.get_trials(deepcopy=False)
        if trial.user_attrs.get("trained") and trial.state.is_finished() and trial.state.name != "FAIL"
    )


# ---------------------------------------------------------------------------------------------------- one trial


class _ReportToPruner(Callback):
    """Reports the validation accuracy after every epoch to the trial; stops the run when the pruner says so."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        value = state.history[-1].get("val_accuracy")
        if value is None:
            return
        self.trial.report(float(value), state.epoch)
        if self.trial.should_prune():
            self.pruned_at = state.epoch
            state.stop = True


def _label(family: str, params: dict[str, Any]) -> str:
    shown = ", ".join(f"{name}={value}" for name, value in params.items() if name != "in_shape")
    return f"{family}({shown})"


def family_shape(problem_in_shape: Sequence[int], fixed: dict[str, dict[str, Any]], family: str) -> tuple[int, ...]:
    """The row shape ``family``'s candidates read: its fixed ``in_shape`` when given, else the data's."""
    shape = fixed.get(family, {}).get("in_shape")
    return tuple(int(size) for size in (shape if shape is not None else problem_in_shape))


def _draw(trial: Any, problem: Problem) -> tuple[str, dict[str, Any], dict[str, float]]:
    family = trial.suggest_categorical("family", problem.families)
    shape = family_shape(problem.in_shape, problem.search.fixed, family)
    params = SEARCH_SPACES[family].suggest(trial, shape, problem.num_classes)
    search = problem.search
    low, high = search.temperature
    knobs = {
        "temperature": trial.suggest_float("temperature", low, high, log=True),
        "soft_weight": trial.suggest_float("soft_weight", *search.soft_weight),
        "lr": trial.suggest_float("lr", *search.lr, log=True),
    }
    return family, params, knobs


def build_candidate(problem: Problem, family: str, params: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The candidate ``family(**fixed, **params)`` built as the final run will build it (seeded, standardisation
    fitted on the training rows); returns the module and its spec."""
    given = dict(problem.search.fixed.get(family, {})) | params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(problem.settings.seed)
        module, spec = build_student(family, problem.train.x, problem.num_classes, **given)
    assert spec is not None
    return module, spec


def candidate_cost(problem: Problem, module: nn.Module, spec: dict[str, Any]) -> Cost:
    """The candidate's cost, measured once per architecture in this process."""
    key = json.dumps(spec, sort_keys=True)
    if key not in problem._costs:
        problem._costs[key] = measure_cost(module, problem.train.x, problem.budget)
    return problem._costs[key]


def short_settings(settings: Settings, knobs: dict[str, float], epochs: int, patience: int | None) -> Settings:
    """``settings`` (a :class:`Settings` or a config's :class:`~kdistill.config.RunConfig`, kept as it is) with
    kd's temperature and soft weight, the learning rate and the run's length set."""
    kd = MethodTerm(name="kd", params={"temperature": knobs["temperature"], "soft_weight": knobs["soft_weight"]})
    optimizer = settings.train.optimizer.model_copy(update={"lr": knobs["lr"]})
    train = settings.train.model_copy(update={"optimizer": optimizer, "epochs": epochs, "patience": patience})
    return settings.model_copy(update={"method": [kd], "train": train})


class _Duplicate(Exception):
    """A warm-start trial that another worker of a shared study queued too (both saw the study empty)."""


def _check_not_a_twin(study: Any, trial: Any) -> None:
    """Two workers starting a shared study at once may both queue the warm start; of two queued trials with the same
    fixed params, the lower-numbered one trains and the other stops here (a decision each makes alone, no race)."""
    if not trial.user_attrs.get("warm_start"):
        return
    trials = study.get_trials(deepcopy=False)
    fixed = next(t for t in trials if t.number == trial.number).system_attrs.get("fixed_params")
    for other in trials:
        twin = other.user_attrs.get("warm_start") and other.system_attrs.get("fixed_params") == fixed
        if other.number < trial.number and twin:
            raise _Duplicate(f"a duplicate of warm-start trial {other.number}")


def _check_not_raced(trial: Any, seen: int) -> None:
    """The sampler is seeded by the number of trials the study held (``seen``), so that one worker's search is the
    same every time it runs. A new trial numbered above ``seen`` means another worker of a shared study created one
    between the count and ``ask``: it may have counted the same and drawn the same candidate, so this draw is
    dropped and the next one, seeded by the new count, is made instead. Queued trials (warm starts, reruns) carry
    their own parameters and are checked by :func:`_check_not_a_twin`."""
    queued = trial.user_attrs.get("warm_start") or "rerun_of" in trial.user_attrs
    if trial.number != seen and not queued:
        raise _Duplicate(
            f"drawn with the seed of trial {seen} while another worker made that trial; drawn again with a fresh seed"
        )


def _objective(problem: Problem, optuna: Any, study: Any) -> Callable[[Any], float]:
    def objective(trial: Any) -> float:
        trial.set_user_attr("worker", _worker())
        _check_not_a_twin(study, trial)
        family, params, knobs = _draw(trial, problem)
        module, spec = build_candidate(problem, family, params)
        cost = candidate_cost(problem, module, spec)
        broken = over_budget(cost, problem.budget)
        for name, value in (
            ("student", spec),
            ("label", _label(family, params)),
            ("parameters", cost.parameters),
            ("size_bytes", cost.size_bytes),
            ("latency_ms", cost.latency_ms),
            ("excess", excess(cost, problem.budget)),
            ("over_budget", broken),
            ("trained", not broken),
        ):
            trial.set_user_attr(name, value)
        if _native_constraints(optuna):
            trial.set_constraint("budget_excess", excess(cost, problem.budget))
        if broken:
            return 0.0
        settings = short_settings(problem.settings, knobs, short_epochs(problem.search), problem.search.patience)
        pruning = _ReportToPruner(trial)
        started = time.perf_counter()
        state = fit(
            module,
            build_loss(settings.method),
            TransferSet(problem.train.x, problem.train.y, problem.targets),
            val=[(problem.val.x, problem.val.y)],
            validate=_classification_validate,
            config=train_config(settings, verbose=False),
            callbacks=[EarlyStopping(monitor="val_accuracy", patience=problem.search.patience, mode="max"), pruning],
            teacher=problem.teacher,
        )
        accuracies = [epoch["val_accuracy"] for epoch in state.history if "val_accuracy" in epoch]
        trial.set_user_attr("epochs_run", len(state.history))
        trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 3))
        trial.set_user_attr("val_accuracy", max(accuracies))
        if problem.verbose:
            what = "pruned" if pruning.pruned_at is not None else f"val accuracy {max(accuracies):.4f}"
            print(f"trial {trial.number}: {_label(family, params)} {cost.describe()}: {what}", flush=True)
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
        return float(max(accuracies))

    return objective


def _classification_validate(model: nn.Module, val: Any) -> dict[str, float]:
    from kdistill.tasks import get_task

    return get_task("classification").validate(model, val)


# ---------------------------------------------------------------------------------------------------- the loop


def run_study(problem: Problem, storage: Any, description: str) -> Trained:
    """Draw and train trials until the study holds ``search.trials`` trained ones (or ``timeout_s`` passes, or its
    short runs total ``max_epochs``, or ``25 * trials`` draws were made), then return every trial of the study (this
    process's and any other's)."""
    optuna = optuna_module()
    started = time.monotonic()
    study = _open_study(optuna, storage, problem)
    if problem.search.warm_start:
        _warm_start(study, problem)
    _recover_stale(optuna, study)
    objective = _objective(problem, optuna, study)
    search = problem.search
    seed = problem.settings.seed if search.seed is None else search.seed
    deadline = None if search.timeout_s is None else started + search.timeout_s
    draws = 0
    while _trained_count(study) < search.trials and draws < _MAX_DRAWS_PER_TRIAL * search.trials:
        if deadline is not None and time.monotonic() > deadline:
            break
        if search.max_epochs is not None and _epochs_spent(study) >= search.max_epochs:
            break
        seen = len(study.get_trials(deepcopy=False))
        study.sampler = _sampler(optuna, seed, seen)
        trial = study.ask()
        draws += 1
        try:
            _check_not_raced(trial, seen)
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except NonFiniteLossError as exc:  # a learning rate too high for this candidate: a bad trial, not a bad search
            trial.set_user_attr("error", exc.message)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        except _Duplicate as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        study.tell(trial, value)
    return Trained(study.get_trials(deepcopy=True), round(time.monotonic() - started, 1), description)


def check_families(search: SearchConfig, in_shape: Sequence[int], num_classes: int) -> list[str]:
    """The families to search: those asked for (each must be a registered student whose space fits the rows), or
    every registered space that fits."""
    problem_families = search.families
    names = list(problem_families) if problem_families is not None else list(SEARCH_SPACES)
    usable = [
        name
        for name in names
        if name in STUDENTS and SEARCH_SPACES[name].fits(family_shape(in_shape, search.fixed, name), num_classes)
    ]
    if problem_families is not None:
        refused = [name for name in names if name not in usable]
        if refused:
            raise ConfigError(
                f"search.families: {refused} cannot read rows of shape {tuple(in_shape)}",
                hint="leave families out to search every family that fits, or set search.fixed.<family>.in_shape.",
            )
    if not usable:
        raise KdistillError(
            f"no registered search family can read rows of shape {tuple(in_shape)}",
            hint=f"registered families: {sorted(SEARCH_SPACES)}",
        )
    return usable
