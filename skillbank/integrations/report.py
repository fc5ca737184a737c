"""``skillbank report``: one self-contained HTML page about a bank — its table, the masks' overlap, where they live.

The page embeds its two plots (:func:`~skillbank.integrations.plots.plot_overlap` and
:func:`~skillbank.integrations.plots.plot_layers`) as PNG data, so it is one file to open, mail or
attach to a run. Every text taken from the bank (names, tasks, metrics, the path) is
HTML-escaped: a bank someone else made cannot put markup or script into the page.
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Sequence
from pathlib import Path

from skillbank.errors import SkillbankError
from skillbank.storage.bank import SkillBank
from skillbank.storage.durable import check_output_path, write_output

__all__ = ["DEFAULT_DETAILED", "MAX_DETAILED", "write_report"]

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
)


def _cell(value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, int) and not isinstance(value, bool):
        value = f"{value:,}"
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


#: Skills whose masks a report compares and places (pairwise overlap is quadratic in them): the largest, by default.
DEFAULT_DETAILED = 20
MAX_DETAILED = 60


def write_report(
    bank: SkillBank | str | Path, out: str | Path, names: Sequence[str] | None = None, detailed: int = DEFAULT_DETAILED
) -> Path:
    """Write ``out`` (an ``.html`` file): the skills of ``bank`` (``names``, default all, in bank order) as a table,
    and for at most ``detailed`` of them (the largest by entries, or ``names`` when given and few enough) their
    pairwise mask overlap (heatmap and numbers) and each one's placement by layer and component.

    The table comes from the manifest alone, so its cost is linear in the skills; only the
    detailed ones are read. The page is written atomically over a regular file only
    (:func:`~skillbank.storage.durable.write_output`). Raises :class:`SkillbankError` for an
    empty bank, an unknown skill, a ``detailed`` outside 1-:data:`MAX_DETAILED` or an output
    that is a link, a directory or a special file.
    """
    from skillbank.integrations import plots

    out = Path(out)
    check_output_path(out)  # before any work
    if not 1 <= detailed <= MAX_DETAILED:
        raise SkillbankError(
            f"detailed skills must be 1-{MAX_DETAILED} (pairwise overlap grows with its square), got {detailed}."
        )
    bank = bank if isinstance(bank, SkillBank) else SkillBank(bank, create=False)
    entries = {e.name: e for e in bank.entries()}
    chosen = list(names) if names else list(entries)
    if not chosen:
        raise SkillbankError(f"{bank.path} holds no skills to report on.")
    unknown = [n for n in chosen if n not in entries]
    if unknown:
        raise SkillbankError(f"{unknown[:5]} are not in {bank.path} (it holds {len(entries)} skills; skillbank list shows them).")
    rows = [
        (e.name, e.task, e.method, e.sparsity, e.entries, e.bytes, e.value_dtype, e.created) for e in (entries[n] for n in chosen)
    ]
    metric_names = sorted({k for n in chosen for k in (entries[n].metrics or {})})
    metric_rows = [[n, *((entries[n].metrics or {}).get(k, "-") for k in metric_names)] for n in chosen]
    largest = set(sorted(chosen, key=lambda n: -entries[n].entries)[:detailed])  # a stable sort: ties in bank order
    shown = [n for n in chosen if n in largest]
    skills = [bank.get(n) for n in shown]  # read (and checked) once, for both plots
    with tempfile.TemporaryDirectory() as tmp:
        overlap = plots.plot_overlap(skills, Path(tmp) / "overlap.png")
        plots.plot_layers(skills, Path(tmp) / "layers.png")
        overlap_png, layers_png = _png(Path(tmp) / "overlap.png", "overlap"), _png(Path(tmp) / "layers.png", "layers")
    overlap_rows = [[a, *(float(overlap[i, j]) for j in range(len(shown)))] for i, a in enumerate(shown)]
    note = (
        ""
        if len(shown) == len(chosen)
        else f"<p>Overlap and placement: the {len(shown)} largest of these {len(chosen):,} skills (by entries); "
        "<code>skillbank report --skills a,b,...</code> picks others, <code>--detailed N</code> shows more.</p>"
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>skillbank report: {html.escape(str(bank.path))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Skill bank {html.escape(str(bank.path))}</h1>",
        f"<p>{len(chosen):,} of {len(entries):,} skills.</p>",
        "<h2>Skills</h2>",
        _table(("name", "task", "method", "sparsity", "entries", "bytes", "values", "created"), rows),
    ]
    if metric_names:
        parts += ["<h2>Metrics</h2>", _table(("name", *metric_names), metric_rows)]
    parts += [
        "<h2>Mask overlap (Jaccard: shared entries / entries of either)</h2>",
        note,
        _table(("", *shown), overlap_rows),
        overlap_png,
        "<h2>Where each mask lives (share of its entries by layer and component)</h2>",
        layers_png,
        "</body></html>\n",
    ]
    return write_output(out, "\n".join(parts).encode("utf-8"))
