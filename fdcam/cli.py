"""The `fdcam` command line: explain, evaluate, export, serve, layers."""

from __future__ import annotations

import argparse
import sys

from .errors import first_line

__all__ = ["main"]


class CommandError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, evaluate_command, explain_command, layers_command
    from .export import command as export_command

    parser = argparse.ArgumentParser(prog="fdcam", description="FD-CAM and other CAM explanations for CNNs.")
    parser.add_argument("--version", action="version", version=f"fdcam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    explain_command.add_arguments(commands.add_parser("explain", help="explain images, writing overlays and maps"))
    evaluate_command.add_arguments(commands.add_parser("evaluate", help="insertion/deletion or pointing game"))
    export_command.add_arguments(commands.add_parser("export", help="export the tail graph to ONNX"))
    layers_command.add_arguments(commands.add_parser("layers", help="list a model's target layers and their output shapes"))
    from .serving import command as serve_command
    from .datasets import command as dataset_command

    dataset_command.add_arguments(
        commands.add_parser("explain-dataset", help="explain a whole dataset on Ray Data (Parquet)")
    )

    serve_command.add_arguments(commands.add_parser("serve", help="serve explanations from Triton Inference Server"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run the command, turn user errors into one line on stderr."""
    args = build_parser().parse_args(argv)
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
