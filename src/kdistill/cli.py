"""The ``kdistill`` command. Thin: it parses arguments, calls the Python API, and prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from kdistill.errors import KdistillError

if TYPE_CHECKING:
    from kdistill.report import Report

__all__ = ["main"]

_console = Console(width=None if sys.stdout.isatty() else 140)


def _with_judgement(report: Report, source: Report | Path | None) -> Report:
    """``report`` with the verdict, advice and privacy of ``source`` (a report, or a folder holding report.json from
    the distillation that made the artefacts) when it has none of its own, so every command prints the same lines."""
    from kdistill.report import Report

    if report.verdict is not None or report.advice or source is None:
        return report
    if isinstance(source, Path):
        saved = source / "report.json"
        if not saved.is_file():
            return report
        source = Report.load(saved)
    report.verdict, report.advice, report.privacy = source.verdict, source.advice, source.privacy
    report.measured = report.measured or source.measured
    return report


def _print_lines(report: Report) -> None:
    for line in report.lines():
        _console.print(line, highlight=False, soft_wrap=True)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdistill.demo import run_demo

    result = run_demo(args.dataset, out=args.out, seed=args.seed, verbose=not args.quiet)
    assert result.report is not None
    _console.print(result.report.table())
    settings = result.report.settings
    _console.print(
        f"retention {result.report.retention:.1%} of the teacher's accuracy; "
        f"{settings['wall_time_s']} s in all; saved to {args.out}/ (student.safetensors, report.json, history.json)"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kdistill.compress.commands import export_saved_student, run_pipeline

    if args.sentence is not None:
        from kdistill.sentence_export import export_sentence_folder

        summary = export_sentence_folder(args.sentence, args.out, int8=args.quantize != "none")
        int8 = (
            f", INT8 {summary['int8']} (min cosine to PyTorch {summary['int8_min_cosine']:.4f})"
            if "int8" in summary
            else ""
        )
        _console.print(
            f"exported {summary['onnx']} (max |ONNX - PyTorch| = {summary['max_abs_diff']:.2e}){int8}", highlight=False
        )
        return 0
    if args.source is not None:
        if args.prune_ratio is not None:
            _console.print("[yellow]--prune-ratio is ignored for a saved student: pruning needs its teacher[/yellow]")
        summary = export_saved_student(
            args.source,
            args.dataset,
            args.out,
            data=args.data,
            quantize=args.quantize,
            tolerance=args.tolerance,
            seed=args.seed,
        )
        source = Path(args.source)
        saved = Path(args.source) if source.is_dir() else source.parent
        if (saved / "report.json").is_file():  # the judgement of the run that made this student
            from kdistill.report import Report

            _print_lines(Report.load(saved / "report.json"))
        accuracy = ", ".join(f"{name} {value:.4f}" for name, value in summary["accuracy"].items())
        _console.print(
            f"exported {summary['export']['path']} (max |ONNX - PyTorch| = {summary['export']['max_abs_diff']:.2e}); "
            f"test accuracy: {accuracy}; saved {args.out}/export.json",
            highlight=False,
        )
        return 0
    if args.data is not None:
        from kdistill.errors import ConfigError

        raise ConfigError(
            "--data without a saved student: the distil -> prune -> quantize -> export pipeline runs on a built-in "
            "data set with its built-in teacher",
            hint="name the student to export (kdistill export RUN_FOLDER --data rows.npz), or use --dataset.",
        )
    result = run_pipeline(
        args.dataset,
        args.out,
        prune_ratio=0.5 if args.prune_ratio is None else args.prune_ratio,
        quantize=args.quantize,
        tolerance=args.tolerance,
        seed=args.seed,
        html=not args.no_html,
        verbose=not args.quiet,
        epochs=args.epochs,
        finetune_epochs=args.finetune_epochs,
    )
    _console.print(result.report.table())
    artefacts = ", ".join(result.report.settings["artefacts"].values())
    _console.print(f"saved to {args.out}/: {artefacts}, report.json, report.html", highlight=False)
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from kdistill.compress.commands import profile_folder
    from kdistill.io import atomic_write_json

    report = profile_folder(
        args.folder,
        args.dataset,
        data=args.data,
        threads=args.threads,
        batch_size=args.batch_size,
        with_teacher=args.teacher,
        seed=args.seed,
    )
    report = _with_judgement(report, Path(args.folder))
    _console.print(report.table())
    target = args.json or f"{args.folder}/profile.json"
    atomic_write_json(target, report.to_dict())
    _console.print(f"saved {target}", highlight=False)
    return 0


_Row = tuple[str, str, "list[str] | bool | None"]
"""A ``kdistill list`` line: name, description, and the params it takes (a list; None: any; False: not shown)."""


def _params_line(params: list[str] | bool | None) -> str:
    if params is None:
        return "any (passed to your factory)"
    return ", ".join(params) if isinstance(params, list) and params else "none"


def _listing() -> dict[str, Callable[[], list[tuple[str, list[_Row]]]]]:
    """Each ``kdistill list WHAT``: sections (a heading, or "" for none) of rows, read from the registries."""

    def methods() -> list[tuple[str, list[_Row]]]:
        from kdistill.losses import list_losses

        return [("", [(info.name, info.description, False) for info in list_losses()])]

    def students() -> list[tuple[str, list[_Row]]]:
        from kdistill.students import STUDENTS

        rows: list[_Row] = [(e.name, e.description, STUDENTS.params(e.name)) for e in STUDENTS.entries()]
        custom = ("custom", "config files only: your nn.Module from student.factory: module:attribute", None)
        return [("", [*rows, custom])]

    def datasets() -> list[tuple[str, list[_Row]]]:
        from kdistill.datasets import DATASETS

        return [("", [(name, description, False) for name, (_, description) in sorted(DATASETS.items())])]

    def teachers() -> list[tuple[str, list[_Row]]]:
        from kdistill.config_recipes import TEACHER_RECIPES
        from kdistill.teachers import ADAPTERS

        kinds: list[_Row] = [(e.name, e.description, TEACHER_RECIPES.params(e.name)) for e in TEACHER_RECIPES.entries()]
        adapters: list[_Row] = [(e.name, e.description, ADAPTERS.params(e.name)) for e in ADAPTERS.entries()]
        return [
            ("teacher kinds (a config's teacher.kind; params: teacher.params)", kinds),
            ("adapters (what kdistill.as_teacher wraps in Python; params: the adapter's keywords)", adapters),
        ]

    def tasks() -> list[tuple[str, list[_Row]]]:
        from kdistill.tasks import list_tasks

        return [("", [(name, description, False) for name, description in list_tasks()])]

    def transfers() -> list[tuple[str, list[_Row]]]:
        from kdistill.transfer import GENERATORS

        return [("", [(e.name, e.description, GENERATORS.params(e.name)) for e in GENERATORS.entries()])]

    return {
        "methods": methods,
        "students": students,
        "datasets": datasets,
        "teachers": teachers,
        "tasks": tasks,
        "transfers": transfers,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from kdistill.config import load_config
    from kdistill.run import run

    config = load_config(args.config, args.set)
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        methods = " + ".join(f"{term.weight:g}*{term.name}" for term in config.method)
        action = "resuming" if args.resume else "running"
        _console.print(
            f"[bold]{action} {config.name}[/bold]: teacher {config.teacher.kind} -> student {config.student.kind}, "
            f"method {methods}, {config.train.epochs} epochs, device {config.device.type}; "
            f"run folder {config.run_folder}",
            highlight=False,
        )
    outcome = run(config, resume=args.resume, verbose=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if outcome.result.report is not None:
        built = outcome.result.report
        _console.print(built.table())
        student = built.models["student"]
        if "spearman" in student:  # an embedding run: how much similarity structure the student kept
            _console.print(
                f"the student's pairwise cosines rank like the teacher's: Spearman {student['spearman']:.3f} "
                f"(hard pairs {student['spearman_hard']:.3f}), recall@10 {student['recall_at_10']:.3f}",
                highlight=False,
            )
        else:
            _console.print(f"retention {built.retention:.1%} of the teacher's accuracy", highlight=False)
    resumed = " (resumed)" if outcome.resumed else ""
    _console.print(f"run{resumed} saved to {outcome.folder}/", highlight=False)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from kdistill.config import load_config
    from kdistill.search import search_config

    config = load_config(args.config, args.set)
    if not args.quiet:
        action = "resuming the search" if args.resume else "searching"
        _console.print(
            f"[bold]{action} {config.name}[/bold]: teacher {config.teacher.kind}, budget "
            f"{config.budget.model_dump(exclude_none=True) if config.budget else {}}; run folder {config.run_folder}",
            highlight=False,
        )
    if args.search_only:
        from kdistill.search import search_config_only

        _console.print(search_config_only(config, verbose=not args.quiet).line(), highlight=False, soft_wrap=True)
        return 0
    distilled, found = search_config(config, resume=args.resume, verbose=not args.quiet, html=not args.no_html)
    if distilled.report is not None:
        _console.print(distilled.report.table())
    _console.print(found.line(), highlight=False, soft_wrap=True)
    _console.print(f"saved to {config.run_folder}/ (search/trials.json, report.json)", highlight=False)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from kdistill.run import validate

    config = validate(args.config, overrides=args.set)
    methods = " + ".join(f"{term.weight:g}*{term.name}" for term in config.method)
    _console.print(
        f"{args.config}: valid. teacher {config.teacher.kind} -> student {config.student.kind}, method {methods}, "
        f"{config.train.epochs} epochs; run folder {config.run_folder}",
        highlight=False,
    )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.markup import escape

    for position, (heading, rows) in enumerate(_listing()[args.what]()):
        if heading:
            _console.print(("\n" if position else "") + f"[bold underline]{heading}[/bold underline]", highlight=False)
        for name, description, params in rows:
            _console.print(f"[bold]{name:<20}[/bold] {escape(description)}", highlight=False, soft_wrap=True)
            if params is not False:
                _console.print(f"{'':<20}   params: {_params_line(params)}", highlight=False, soft_wrap=True)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from kdistill.cache import cache_entries, clear_cache, default_cache_dir

    root = args.dir or default_cache_dir()
    if args.action == "clear":
        removed = clear_cache(root, args.names or None)
        _console.print(f"removed {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'} from {root}")
        return 0
    entries = cache_entries(root)
    if not entries:
        _console.print(f"no cache entries in {root}")
        return 0
    _console.print(
        f"[bold]{'entry':<32}  {'status':<8} {'rows':>9} {'classes':>7} {'storage':<8} {'MB':>9}  teacher   data      "
        f"{'tokens':>10} {'B/token':>8}  kind"
    )
    for info in entries:
        per_token = info.bytes_per_token  # token-level entries ((rows, seq, vocab) outputs) only
        _console.print(
            f"{info.name:<32}  {info.status:<8} {info.rows or 0:>9} {info.classes or 0:>7} {info.storage or '?':<8} "
            f"{info.size_bytes / 1e6:>9.3f}  {(info.teacher or '?')[:8]:<8}  {(info.data or '-')[:8]:<8}  "
            f"{info.tokens or '-':>10} {'-' if per_token is None else f'{per_token:.1f}':>8}  {info.kind or '?'}",
            highlight=False,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Distil a large teacher into a small, fast student.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="distil a teacher on built-in data and print the report")
    demo.add_argument(
        "--dataset",
        choices=["digits", "mnist1d"],
        default="digits",
        help="digits: RandomForest(200) -> MLP (~10 s); mnist1d: CNN -> small CNN (~1-2 min)",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="folder for the saved student and report (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)

    export = commands.add_parser(
        "export",
        help="distil -> prune -> quantize -> export on built-in data, or a saved student to ONNX + INT8",
    )
    export.add_argument(
        "source", nargs="?", help="a saved student (run folder or student.safetensors); omit to run the pipeline"
    )
    export.add_argument(
        "--sentence", default=None, metavar="FOLDER", help="a sentence-transformers folder to export as ONNX (+ INT8)"
    )
    export.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits", help="rows and labels to use")
    export.add_argument(
        "--data", default=None, metavar="FILE.npz", help="your own rows instead (x or x.input_ids, ..., and y)"
    )
    export.add_argument("--out", default="runs/compress", help="folder for the artefacts (default: %(default)s)")
    export.add_argument("--prune-ratio", type=float, default=None, help="channels removed per layer (default 0.5)")
    export.add_argument("--quantize", choices=["auto", "dynamic", "static", "none"], default="auto")
    export.add_argument("--tolerance", type=float, default=1e-4, help="max |ONNX - PyTorch| logit difference")
    export.add_argument("--epochs", type=int, default=100, help="distillation epochs, early-stopped (pipeline)")
    export.add_argument("--finetune-epochs", type=int, default=50, help="KD fine-tuning epochs after pruning")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--no-html", action="store_true", help="skip report.html (needs matplotlib)")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.set_defaults(handler=_cmd_export)

    profile = commands.add_parser("profile", help="size, latency (p50/p95), throughput, memory of saved artefacts")
    profile.add_argument("folder", help="a folder written by `kdistill export` (its *.onnx and student.safetensors)")
    profile.add_argument("--dataset", choices=["digits", "mnist1d"], default="digits", help="rows to time and score")
    profile.add_argument(
        "--data", default=None, metavar="FILE.npz", help="your own rows instead (x or x.input_ids, ..., and y)"
    )
    profile.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    profile.add_argument("--batch-size", type=int, default=256, help="batch for the throughput figure")
    profile.add_argument("--teacher", action="store_true", help="retrain the built-in teacher and profile it too")
    profile.add_argument("--seed", type=int, default=0)
    profile.add_argument("--json", default=None, help="where to write the results (default: FOLDER/profile.json)")
    profile.set_defaults(handler=_cmd_profile)

    run = commands.add_parser("run", help="run a distillation from a YAML config (checkpointed, resumable)")
    run.add_argument("config", help="the YAML config file (see examples/ and docs/config.md)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.epochs=5"
    )
    run.add_argument("--resume", action="store_true", help="continue the run in the config's folder")
    run.add_argument("--quiet", action="store_true", help="no per-epoch console lines")
    run.set_defaults(handler=_cmd_run)

    search = commands.add_parser(
        "search", help="search the most accurate student inside a budget (the config's budget: and search:)"
    )
    search.add_argument("config", help="a YAML config with budget: and search: sections (docs/search.md)")
    search.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. search.trials=10"
    )
    search.add_argument("--resume", action="store_true", help="continue a killed search in the config's folder")
    search.add_argument(
        "--search-only", action="store_true", help="only search (a worker of a shared study): no full training"
    )
    search.add_argument("--no-html", action="store_true", help="skip report.html (needs matplotlib)")
    search.add_argument("--quiet", action="store_true", help="no per-trial lines")
    search.set_defaults(handler=_cmd_search)

    check = commands.add_parser("validate", help="check a YAML config (fields, names, files, references)")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    check.set_defaults(handler=_cmd_validate)

    listing = commands.add_parser(
        "list", help="list what exists: methods, students, datasets, teachers, tasks, transfers"
    )
    listing.add_argument("what", choices=sorted(_listing()))
    listing.set_defaults(handler=_cmd_list)

    cache = commands.add_parser("cache", help="list or clear the teacher-output cache")
    cache_actions = cache.add_subparsers(dest="action", required=True)
    cache_dir_help = "cache folder (default: $KDISTILL_CACHE_DIR or ./.kdistill-cache)"
    cache_ls = cache_actions.add_parser(
        "ls", help="list the entries and chunk stores: status, rows, storage, size, fingerprints, kind"
    )
    cache_ls.add_argument("--dir", default=None, help=cache_dir_help)
    cache_clear = cache_actions.add_parser(
        "clear", help="delete entries or chunk stores (everything when no name is given)"
    )
    cache_clear.add_argument("names", nargs="*", help="entry names (or unique prefixes) from `kdistill cache ls`")
    cache_clear.add_argument("--dir", default=None, help=cache_dir_help)
    cache.set_defaults(handler=_cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KdistillError as exc:
        _console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
