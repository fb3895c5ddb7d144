"""The ``kdistill`` command. Thin: it parses arguments, calls the Python API, and prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rich.console import Console

from kdistill.errors import KdistillError

__all__ = ["main"]

_console = Console(width=None if sys.stdout.isatty() else 140)


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


def _listing() -> dict[str, Callable[[], list[tuple[str, str]]]]:
    def methods() -> list[tuple[str, str]]:
        from kdistill.losses import list_losses

        return [(info.name, info.description) for info in list_losses()]

    def students() -> list[tuple[str, str]]:
        from kdistill.students import STUDENTS

        return sorted(STUDENTS.items())

    def datasets() -> list[tuple[str, str]]:
        from kdistill.datasets import DATASETS

        return [(name, description) for name, (_, description) in sorted(DATASETS.items())]

    def teachers() -> list[tuple[str, str]]:
        from kdistill.recipes import TEACHER_RECIPES

        return [(name, recipe.description) for name, recipe in TEACHER_RECIPES.items()]

    return {"methods": methods, "students": students, "datasets": datasets, "teachers": teachers}


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
    if outcome.result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if outcome.result.report is not None:
        _console.print(outcome.result.report.table())
        _console.print(f"retention {outcome.result.report.retention:.1%} of the teacher's accuracy", highlight=False)
    resumed = " (resumed)" if outcome.resumed else ""
    _console.print(f"run{resumed} saved to {outcome.folder}/", highlight=False)
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
    for name, description in _listing()[args.what]():
        _console.print(f"[bold]{name:<12}[/bold] {description}", highlight=False)
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

    run = commands.add_parser("run", help="run a distillation from a YAML config (checkpointed, resumable)")
    run.add_argument("config", help="the YAML config file (see examples/ and docs/config.md)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.epochs=5"
    )
    run.add_argument("--resume", action="store_true", help="continue the run in the config's folder")
    run.add_argument("--quiet", action="store_true", help="no per-epoch console lines")
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("validate", help="check a YAML config (fields, names, files, references)")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    check.set_defaults(handler=_cmd_validate)

    listing = commands.add_parser("list", help="list what exists: methods, students, datasets, teachers")
    listing.add_argument("what", choices=sorted(_listing()))
    listing.set_defaults(handler=_cmd_list)
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
