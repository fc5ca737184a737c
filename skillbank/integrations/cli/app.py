"""``main``: the command's entry point, errors to exit codes, one-line warnings and quiet libraries; ``build_parser``
assembles the command groups, each of which registers its own subcommands beside its handlers."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skillbank.errors import SkillbankError
from skillbank.integrations.cli import exporting, localizing, registry, running, serving

__all__ = ["EXIT_BAD_INPUT", "EXIT_BROKEN_PIPE", "EXIT_INTERRUPTED", "build_parser", "main"]


#: Exit codes: bad input (and any refused operation) is 2; ``verify`` alone uses 1, for damaged skills.
EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 130, 141


#: Third-party warnings that say nothing a skillbank user can act on, by message.
_NOISE = (r".*isinstance\(treespec, LeafSpec\).*", r".*does not have many workers.*")  # Lightning's, by message


_NOISY_KINDS = ("JsonargparseDeprecationWarning",)  # LightningCLI's use of jsonargparse, by category


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skillbank`` command; returns the exit code.

    Every failure is one line on stderr: 2 for bad input or a refused operation (a missing file, a full
    disk), 1 only from ``verify`` for damaged skills, 130 for Ctrl-C, and a quiet 141 when the reader of
    the output goes away (``skillbank list | head -1``), as ``git`` does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        with warnings.catch_warnings():
            _one_line_warnings()
            return _run(argv)
    except KeyboardInterrupt:
        print(f"\nskillbank{' ' + command if command else ''}: interrupted; nothing half-written was left.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: list[str]) -> int:
    if argv[:1] in (["fit"], ["validate"]):
        from skillbank.integrations.fit import run_lightning

        _quiet_libraries()
        try:
            return run_lightning(argv[0], argv[1:])
        except SkillbankError as exc:
            return _fail(argv[0], str(exc))
        except OSError as exc:
            return _fail(argv[0], _os_error(exc))
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        _resolve_models(args)
        return args.run(args)
    except SkillbankError as exc:
        return _fail(args.command, str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:
        return _fail(args.command, _os_error(exc))


def _fail(command: str, message: str) -> int:
    print(f"skillbank {command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _os_error(exc: OSError) -> str:
    """An operating-system error as one line: what failed, on which file, and what to do for the common ones."""
    where = f" ({exc.filename})" if exc.filename else ""
    advice = {
        errno.ENOSPC: " Free some space and run it again; nothing half-written was left.",
        errno.EDQUOT: " Free some space and run it again; nothing half-written was left.",
        errno.EACCES: " Check the permissions, or write somewhere else.",
        errno.EROFS: " The file system is read-only; write somewhere else.",
    }.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}{where}.{advice}"


def _one_line_warnings() -> None:
    """Warnings as one line each (``skillbank: warning: ...``, no source line), third-party noise filtered by name."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    own = tuple(str(Path(folder).resolve()) + os.sep for folder in _package_folders())

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if category.__name__ in _NOISY_KINDS:
            return
        who = "skillbank: warning" if str(Path(filename).resolve()).startswith(own) else category.__name__
        print(f"{who}: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def _package_folders() -> list[str]:
    """skillbank's folders (the package and its callbacks, which may live apart in an editable install)."""
    import importlib.util

    import skillbank

    spec = importlib.util.find_spec("skillbank.callbacks")  # imports skillbank only, not lightning
    return [*skillbank.__path__, *(spec.submodule_search_locations or [] if spec else [])]


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _quiet_libraries() -> None:
    """Library chatter off, so skillbank's own lines are what a user reads (``--verbose`` keeps it)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported (main() called from Python): the variables came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _resolve_models(args: argparse.Namespace) -> None:
    """Turn ``pulled:<alias>`` model arguments into their folders (pulling on first use), here at the edge:
    the core only reads folders. ``args.given`` keeps what was typed, for the skills' provenance."""
    args.given = {}
    for key in ("base", "finetuned"):
        value = getattr(args, key, None)
        if isinstance(value, str):
            from skillbank.integrations.pulled.wheels import resolve_model

            args.given[key] = value
            setattr(args, key, str(resolve_model(value)))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``skillbank`` command."""
    parser = argparse.ArgumentParser(
        prog="skillbank",
        description="Localize the ~1% of parameters that carry each finetuned skill, keep skills in a durable "
        "bank, and stitch them onto the base model (Localize-and-Stitch).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the libraries' own logs and progress bars (transformers, Hugging Face Hub)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (running, localizing, registry, exporting, serving):
        group.register(sub)
    return parser
