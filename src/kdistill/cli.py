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
        return [
            ("sklearn", "a fitted scikit-learn classifier (predict_proba, else decision_function)"),
            ("torch", "a torch.nn.Module returning logits (or probabilities with output='probs')"),
            ("hf", "a Hugging Face transformers model with .logits, from a local folder or a config [hf extra]"),
            ("onnx", "an .onnx file run by ONNX Runtime, output chosen by name [onnx extra]"),
            ("callable", "a function batch -> probabilities or logits: batched, retried, resumable journal"),
            ("file", "precomputed outputs in .npy, .safetensors or .parquet (with row ids)"),
            ("ensemble", "several teachers: mean of probabilities or of logits, optional weights"),
        ]

    return {"methods": methods, "students": students, "datasets": datasets, "teachers": teachers}


def _cmd_list(args: argparse.Namespace) -> int:
    for name, description in _listing()[args.what]():
        _console.print(f"[bold]{name:<12}[/bold] {description}", highlight=False)
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
        f"[bold]{'entry':<32}  {'status':<8} {'rows':>9} {'classes':>7} {'storage':<8} {'MB':>9}  teacher   data"
    )
    for info in entries:
        status = "complete" if info.complete else "partial"
        _console.print(
            f"{info.name:<32}  {status:<8} {info.rows or 0:>9} {info.classes or 0:>7} {info.storage or '?':<8} "
            f"{info.size_bytes / 1e6:>9.3f}  {(info.teacher or '?')[:8]}  {(info.data or '?')[:8]}",
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

    listing = commands.add_parser("list", help="list what exists: methods, students, datasets, teachers")
    listing.add_argument("what", choices=sorted(_listing()))
    listing.set_defaults(handler=_cmd_list)

    cache = commands.add_parser("cache", help="list or clear the teacher-output cache")
    cache_actions = cache.add_subparsers(dest="action", required=True)
    cache_dir_help = "cache folder (default: $KDISTILL_CACHE_DIR or ./.kdistill-cache)"
    cache_ls = cache_actions.add_parser("ls", help="list the entries: status, rows, storage, size, fingerprints")
    cache_ls.add_argument("--dir", default=None, help=cache_dir_help)
    cache_clear = cache_actions.add_parser("clear", help="delete entries (every entry when no name is given)")
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
