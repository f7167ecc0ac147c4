"""The `fdcam` command line: explain, evaluate, export, serve, layers."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from .errors import first_line

__all__ = ["main"]


class CommandError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with a bad option reported in one line (no usage block), exit status 2; --help still prints usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, evaluate_command, explain_command, layers_command
    from .export import command as export_command

    parser = OneLineParser(prog="fdcam", description="FD-CAM and other CAM explanations for CNNs.")
    parser.add_argument("--version", action="version", version=f"fdcam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)  # subcommand parsers are OneLineParsers too
    explain_command.add_arguments(commands.add_parser("explain", help="explain images, writing overlays and maps"))
    evaluate_command.add_arguments(commands.add_parser("evaluate", help="insertion/deletion or pointing game"))
    export_command.add_arguments(commands.add_parser("export", help="export the tail graph to ONNX"))
    layers_command.add_arguments(
        commands.add_parser("layers", help="list a model's target layers and their output shapes")
    )
    from .datasets import command as dataset_command
    from .serving import command as serve_command

    dataset_command.add_arguments(
        commands.add_parser("explain-dataset", help="explain a whole dataset on Ray Data (Parquet)")
    )

    serve_command.add_arguments(commands.add_parser("serve", help="serve explanations from Triton Inference Server"))
    return parser


def _fdcam_folders() -> tuple[Path, ...]:
    """The source folders of fdcam's packages (fdcam.export and fdcam.runtime live beside fdcam/, not in it)."""
    folders = []
    for name in ("fdcam", "fdcam.export", "fdcam.runtime"):
        spec = importlib.util.find_spec(name)
        if spec is not None:
            folders += [Path(folder).resolve() for folder in spec.submodule_search_locations or []]
    return tuple(folders)


def _warning_printer():
    """A warnings.showwarning that prints fdcam's own warnings as one line `fdcam: warning: …` (no file, no source
    line: the CLI user cannot act on them); other packages' warnings keep Python's format."""
    folders = _fdcam_folders()
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not _inside(filename, folders):
            default(message, category, filename, lineno, file, line)
            return
        from tqdm.auto import tqdm

        # tqdm.write: above a progress bar, not on its line
        tqdm.write(f"fdcam: warning: {first_line(message, limit=None)}", file=file or sys.stderr)

    return show


def _inside(filename: str, folders: tuple[Path, ...]) -> bool:
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return any(path.is_relative_to(folder) for folder in folders)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the command, turn user errors into one line on stderr."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # the library's warnings stay Python warnings; only the CLI prints them its way
        warnings.showwarning = _warning_printer()
        try:
            return int(args.run(args) or 0)
        except KeyboardInterrupt:
            print("fdcam: interrupted", file=sys.stderr)
            return 130
        except (CommandError, ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as error:
            print(f"fdcam: error: {first_line(error, limit=None)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
