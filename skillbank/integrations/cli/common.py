"""What every command shares: argument types checked when parsed, and output that is safe on any terminal
(escaped text, tables, strict JSON, progress bars only on a tty)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from skillbank.errors import SkillbankError

__all__ = [
    "command",
    "cell",
    "escape",
    "finite",
    "positive_float_arg",
    "print_json",
    "progress",
    "recovery_cell",
    "regex_arg",
    "skill_list_arg",
    "sparsity_arg",
    "sparsity_or_auto_arg",
    "table",
]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:  # a tqdm bar; kwargs as tqdm's
    """A tqdm progress bar on stderr, shown only on a terminal (a log file gets no ``\\r`` lines)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


def regex_arg(text: str) -> str:
    """A regular expression argument, checked when parsed (not a traceback after loading the models)."""
    import re

    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({exc}).") from None
    return text


def skill_list_arg(text: str) -> list[str]:
    """``--skills a,b``: the names, in order; an empty list is a mistake, not "every skill"."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no skill names in {text!r}; leave --skills out to use every skill.")
    return names


def sparsity_or_auto_arg(text: str) -> float | str:
    return "auto" if text == "auto" else sparsity_arg(text)


def sparsity_arg(text: str) -> float:
    from skillbank.sparse import check_sparsity

    try:
        return check_sparsity(float(text))
    except (ValueError, SkillbankError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_float_arg(text: str) -> float:
    """A finite number above 0 (a scale), checked when parsed."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number.") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number above 0.")
    return value


def escape(text: str) -> str:
    """``text`` with control characters (terminal escapes, newlines) shown as Python escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def print_json(document: dict) -> int:
    """Print ``document`` as strict JSON on stdout: non-finite numbers (a NaN metric) as ``null``, which the schemas
    allow for any number; non-ASCII and control characters escaped, so it is safe on any terminal."""
    print(json.dumps(finite(document), indent=1, sort_keys=True, ensure_ascii=True, allow_nan=False))
    return 0


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float in it replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def recovery_cell(metrics: dict) -> str:
    """The validation recovery a skill was sized by (``sparsity="auto"``), or ``-``."""
    value = metrics.get("val_recovery")
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def command(
    sub: Any,
    name: str,
    run: Callable[[argparse.Namespace], int],
    help: str,
    description: str,
    *,
    skill: bool = False,
    json_output: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand that works on one bank: its parser with the ``bank`` argument (and ``name`` with ``skill``,
    ``--json`` with ``json_output``), whose handler is ``run``; the caller adds the rest."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument("bank", help="the bank directory")
    if skill:
        parser.add_argument("name", help="the skill's name")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts (schema in the README)")
    parser.set_defaults(run=run)
    return parser
