"""Reports on selections: summary, per-block table, overlap matrix, coverage plot.

Every report is first computed as plain typed data (:class:`Summary`, :class:`BlockRow`,
:class:`OverlapMatrix`), which ``--json`` prints as is; renderers turn that data into text
(``--plain``, whose block lines keep the format of the original "Selection Rate Report"), rich
tables, or a matplotlib figure. Nothing here reads tensor values: a report needs only the
selection and its manifest.

Flag rule of the per-block table: a block's *rate* is its selected parameters over its total
parameters; the block is ``LOW`` when ``rate < ff / tolerance`` and ``HIGH`` when
``rate > ff * tolerance`` (``tolerance`` = :data:`FLAG_TOLERANCE` = 1.25 by default, i.e. more than
25 % above or 20 % below the requested fraction). With the original seed logs this flags
0.00 % and 0.01 % as ``LOW`` and 7.46 % as ``HIGH`` for targets of 0.1 %, 1 % and 5 %, exactly
as they were logged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .figures import pyplot, save_figure
from .manifest import Manifest
from .names import BlockKey, filter_names
from .selection import Selection, overlap_count

FLAG_TOLERANCE = 1.25
REPORT_SCHEMA = 1


# -- summary -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """The headline numbers of a selection."""

    selector: str
    params: dict[str, Any]
    fingerprint: str
    manifest_fingerprint: str
    source: str
    total_params: int
    target: int
    selected: int
    ff: float
    tensors_touched: int
    tensors_eligible: int  # after --include/--exclude
    tensors_total: int
    blocks_covered: int
    blocks_total: int
    capacity: int | None  # elements this id can hold (spread), None for compat-v2

    @property
    def selected_fraction(self) -> float:
        return self.selected / self.total_params

    @property
    def target_fraction(self) -> float:
        return self.target / self.total_params

    @property
    def capacity_fraction(self) -> float | None:
        return None if self.capacity is None else self.capacity / self.total_params

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["selected_fraction"] = self.selected_fraction
        d["target_fraction"] = self.target_fraction
        d["capacity_fraction"] = self.capacity_fraction
        return d


def eligible_names(sel: Selection) -> list[str]:
    """Tensor names the selector could pick from (the manifest after ``include``/``exclude``)."""
    return filter_names(sel.manifest.names, sel.params.get("include"), sel.params.get("exclude"))


def selection_capacity(sel: Selection) -> int | None:
    """Elements the selection's id can hold in its layout (``None`` where only the model limits it)."""
    from .select import SelectionSettings

    return SelectionSettings.from_selection(sel).capacity(sel.manifest)


def summarize(sel: Selection) -> Summary:
    """The :class:`Summary` of ``sel``."""
    m = sel.manifest
    blocks = m.blocks()
    covered = {m.block_of(n) for n in sel} - {None}
    return Summary(
        selector=sel.selector,
        params=dict(sel.params),
        fingerprint=sel.fingerprint,
        manifest_fingerprint=m.fingerprint,
        source=m.source,
        total_params=sel.total_params,
        target=sel.target,
        selected=sel.selected,
        ff=float(sel.params["ff"]),
        tensors_touched=len(sel),
        tensors_eligible=len(eligible_names(sel)),
        tensors_total=len(m),
        blocks_covered=len(covered),
        blocks_total=len(blocks),
        capacity=selection_capacity(sel),
    )


# -- per-block table -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockRow:
    """One line of the per-block table (``block`` is ``None`` for the tensors outside blocks)."""

    label: str
    block: BlockKey | None
    selected: int
    total: int
    tensors_touched: int
    tensors_total: int
    picked: list[str] | None  # sorted local names when the selection picks whole tensors
    flag: str | None  # "LOW", "HIGH" or None

    @property
    def rate(self) -> float:
        return self.selected / self.total if self.total else 0.0

    def what(self) -> str:
        """What was selected: ``[a, b]`` for whole-tensor selections, else ``touched/total tensors``."""
        if self.picked is not None:
            return "[" + ", ".join(self.picked) + "]"
        return f"{self.tensors_touched}/{self.tensors_total} tensors"

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.label,
            "group": None if self.block is None else self.block.group,
            "index": None if self.block is None else self.block.index,
            "selected": self.selected,
            "total": self.total,
            "rate": self.rate,
            "tensors_touched": self.tensors_touched,
            "tensors_total": self.tensors_total,
            "picked": self.picked,
            "flag": self.flag,
        }


def flag_rate(rate: float, ff: float, tolerance: float = FLAG_TOLERANCE) -> str | None:
    """``"LOW"`` / ``"HIGH"`` when ``rate`` is more than a factor ``tolerance`` off ``ff``, else ``None``."""
    if rate < ff / tolerance:
        return "LOW"
    if rate > ff * tolerance:
        return "HIGH"
    return None


def local_name(name: str, block: BlockKey | None) -> str:
    """``name`` without its block prefix (``blocks.3.ffn.0.weight`` -> ``ffn.0.weight``)."""
    if block is None:
        return name
    prefix = f"{block.group}.{block.index}." if block.group else f"{block.index}."
    return name[len(prefix) :] if name.startswith(prefix) else name


def block_rows(sel: Selection, tolerance: float = FLAG_TOLERANCE) -> list[BlockRow]:
    """Per-block rows in block order, then one ``other`` row for tensors outside blocks (if any)."""
    m = sel.manifest
    ff = float(sel.params["ff"])
    tensor_level = all(p.whole for p in sel.values())
    groups: dict[BlockKey | None, list[str]] = {}
    for name in m.names:
        groups.setdefault(m.block_of(name), []).append(name)
    keys: list[BlockKey | None] = sorted(k for k in groups if k is not None)
    single = len({k.group for k in keys if k is not None}) <= 1
    if None in groups:
        keys.append(None)
    rows = []
    for key in keys:
        members = groups[key]
        touched = [n for n in members if n in sel]
        selected = sum(sel[n].count for n in touched)
        total = sum(m[n].numel for n in members)
        picked = sorted(local_name(n, key) for n in touched) if tensor_level else None
        rows.append(
            BlockRow(
                label="other" if key is None else key.label(single),
                block=key,
                selected=selected,
                total=total,
                tensors_touched=len(touched),
                tensors_total=len(members),
                picked=picked,
                flag=flag_rate(selected / total if total else 0.0, ff, tolerance),
            )
        )
    return rows


def format_block_line(row: BlockRow) -> str:
    """One block in the seed's log format:
    ``Block 00: 0.00% selected (10,240 / 351,394,304 params) | Selected: [a, b] [LOW]``."""
    head = "Other" if row.block is None else f"Block {row.label}"
    flag = f" [{row.flag}]" if row.flag else ""
    return (
        f"{head}: {row.rate * 100:.2f}% selected ({row.selected:,} / {row.total:,} params) | "
        f"Selected: {row.what()}{flag}"
    )


# -- whole report (JSON / plain / rich) -----------------------------------------------------------
def report_dict(sel: Selection, tolerance: float = FLAG_TOLERANCE) -> dict[str, Any]:
    """The full plan report as JSON-ready data (schema in docs/selectors.md)."""
    return {
        "schema": REPORT_SCHEMA,
        "summary": summarize(sel).to_dict(),
        "blocks": [r.to_dict() for r in block_rows(sel, tolerance)],
        "tensors": {n: {"shape": list(p.shape), "count": p.count, "whole": p.whole} for n, p in sel.items()},
    }


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if v not in (None, [], ()))


def summary_lines(s: Summary) -> list[str]:
    """The summary as plain text lines."""
    lines = [
        f"Model: {s.source} ({s.tensors_total:,} tensors, {s.total_params:,} parameters, "
        f"manifest {s.manifest_fingerprint})",
        f"Selector: {s.selector} ({_params_text(s.params)})",
        f"Target: {s.target:,} params ({s.target_fraction:.4%}); selected: {s.selected:,} params "
        f"({s.selected_fraction:.4%}, {s.selected - s.target:+,} vs target)",
        f"Tensors touched: {s.tensors_touched:,} / {s.tensors_total:,}"
        + (f" ({s.tensors_eligible:,} allowed by filters)" if s.tensors_eligible < s.tensors_total else ""),
        f"Blocks covered: {s.blocks_covered} / {s.blocks_total}",
    ]
    if s.capacity is not None:
        lines.append(
            f"Capacity of id {s.params['ffid']} ({s.params.get('slots')} slots): {s.capacity:,} params "
            f"({s.capacity_fraction:.4%}), used {s.selected / s.capacity:.1%}"
        )
    lines.append(f"Fingerprint: {s.fingerprint}")
    return lines


def render_plain(sel: Selection, tolerance: float = FLAG_TOLERANCE) -> str:
    """Summary and the per-block table as plain text (block lines in the seed's format)."""
    s = summarize(sel)
    lines = summary_lines(s)
    lines.append(f"Selection Rate Report (target is {s.ff * 100:.2f}%):")
    lines += [format_block_line(r) for r in block_rows(sel, tolerance)]
    return "\n".join(lines) + "\n"


def render_rich(sel: Selection, console: Any = None, tolerance: float = FLAG_TOLERANCE) -> None:
    """Print the summary and per-block table with rich (to ``console``, default stdout)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    s = summarize(sel)
    for line in summary_lines(s):
        key, _, value = line.partition(": ")
        console.print(f"[bold]{key}:[/bold] {escape(value)}", highlight=False)
    table = Table(title=f"Selection rate per block (target {s.ff * 100:.2f}%)", title_justify="left")
    # Numbers never wrap; the (possibly long) list of picked tensors folds instead.
    table.add_column("block", no_wrap=True)
    table.add_column("rate", justify="right", no_wrap=True)
    table.add_column("selected", justify="right", no_wrap=True)
    table.add_column("of", justify="right", no_wrap=True)
    table.add_column("what", overflow="fold", min_width=12)
    table.add_column("flag", no_wrap=True)
    style = {"LOW": "yellow", "HIGH": "red"}
    for r in block_rows(sel, tolerance):
        table.add_row(
            escape(r.label),
            f"{r.rate * 100:.4f}%",
            f"{r.selected:,}",
            f"{r.total:,}",
            escape(r.what()),
            r.flag or "",
            style=style.get(r.flag or ""),
        )
    console.print(table)


# -- manifest listing ----------------------------------------------------------------------------
def manifest_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Every tensor as ``{name, shape, dtype, numel, block}`` (block label or ``None``)."""
    blocks = manifest.blocks()
    single = len({b.group for b in blocks}) <= 1
    rows = []
    for t in manifest:
        b = manifest.block_of(t.name)
        rows.append(
            {
                "name": t.name,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "numel": t.numel,
                "block": None if b is None else b.label(single),
            }
        )
    return rows


def render_manifest_plain(manifest: Manifest) -> str:
    """One line per tensor: name, shape, dtype, block; patterns are matched against these names."""
    rows = manifest_rows(manifest)
    width = max(len(r["name"]) for r in rows)
    lines = [
        f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])) or 'scalar':<18} {r['dtype']:<5} "
        f"{'block ' + r['block'] if r['block'] is not None else '-'}"
        for r in rows
    ]
    lines.append(
        f"{len(rows):,} tensors, {manifest.total_params:,} parameters, {len(manifest.blocks())} blocks"
    )
    return "\n".join(lines) + "\n"


# -- overlap -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverlapMatrix:
    """Pairwise overlaps: ``counts[i][j]`` elements selected by both ``labels[i]`` and ``labels[j]``.

    The diagonal holds each selection's own size.
    """

    labels: list[str]
    counts: list[list[int]]
    fingerprints: list[str] = field(default_factory=list)

    @property
    def overlapping_pairs(self) -> list[tuple[str, str, int]]:
        n = len(self.labels)
        return [
            (self.labels[i], self.labels[j], self.counts[i][j])
            for i in range(n)
            for j in range(i + 1, n)
            if self.counts[i][j]
        ]

    @property
    def disjoint(self) -> bool:
        return not self.overlapping_pairs

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "matrix": self.counts,
            "fingerprints": self.fingerprints,
            "overlapping_pairs": [list(p) for p in self.overlapping_pairs],
            "disjoint": self.disjoint,
        }


def overlap_matrix(selections: Sequence[Selection], labels: Sequence[str] | None = None) -> OverlapMatrix:
    """Pairwise overlap counts between selections of the same model.

    Tensors are matched by canonical name; ``spread`` pairs cost O(1) per tensor (rank ranges
    are compared, no index is materialised).
    """
    labels = list(labels) if labels is not None else [f"ffid {s.params.get('ffid')}" for s in selections]
    n = len(selections)
    counts = [[0] * n for _ in range(n)]
    for i, a in enumerate(selections):
        counts[i][i] = a.selected
        for j in range(i + 1, n):
            b = selections[j]
            c = sum(overlap_count(a[name], b[name]) for name in a if name in b)
            counts[i][j] = counts[j][i] = c
    return OverlapMatrix(labels, counts, [s.fingerprint for s in selections])


def render_overlap_plain(mat: OverlapMatrix) -> str:
    """The matrix as a text grid, then one verdict line."""
    cells = [[f"{c:,}" for c in row] for row in mat.counts]
    width = max([len(x) for row in cells for x in row] + [len(lb) for lb in mat.labels])
    lines = [" " * width + "  " + "  ".join(f"{lb:>{width}}" for lb in mat.labels)]
    for lb, row in zip(mat.labels, cells, strict=True):
        lines.append(f"{lb:>{width}}  " + "  ".join(f"{x:>{width}}" for x in row))
    lines.append(_overlap_verdict(mat))
    return "\n".join(lines) + "\n"


def _overlap_verdict(mat: OverlapMatrix) -> str:
    n = len(mat.labels)
    pairs = n * (n - 1) // 2
    bad = mat.overlapping_pairs
    if not bad:
        return f"All {pairs} pairs disjoint (0 shared elements)."
    worst = ", ".join(f"{a} & {b}: {c:,}" for a, b, c in bad[:5])
    return f"{len(bad)} of {pairs} pairs overlap ({worst}{', ...' if len(bad) > 5 else ''})."


def render_overlap_rich(mat: OverlapMatrix, console: Any = None) -> None:
    """Print the overlap matrix with rich (diagonal: each id's size, dimmed)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    # Sizes get their own column so that the pair columns stay narrow (mostly "0").
    table = Table(title="Elements shared between ids", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("selected", justify="right", no_wrap=True)
    for lb in mat.labels:
        table.add_column(lb.removeprefix("ffid "), justify="right", no_wrap=True)
    for i, lb in enumerate(mat.labels):
        cells = ["-" if i == j else (f"[red]{c:,}[/red]" if c else "0") for j, c in enumerate(mat.counts[i])]
        table.add_row(lb, f"{mat.counts[i][i]:,}", *cells)
    console.print(table)
    console.print(_overlap_verdict(mat), style="green" if mat.disjoint else "red bold", highlight=False)


# -- plot ----------------------------------------------------------------------------------------
def plot_coverage(
    selections: Sequence[Selection],
    path: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
) -> Path:
    """Write a figure of the per-block selected fraction of each selection (one line per id).

    The format follows the file extension (png, svg, pdf, ...); the file is written atomically.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(
            f"--plot {str(path)!r}: folder {str(path.parent)!r} does not exist; create it first"
        )
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        plt = pyplot()
    except ImportError:
        raise ConfigError("--plot needs matplotlib; pip install 'ffid[plot]'") from None
    if fmt not in plt.figure().canvas.get_supported_filetypes():
        plt.close("all")
        raise ConfigError(f"--plot {str(path)!r}: unknown image format {fmt!r}; use .png, .svg or .pdf")
    plt.close("all")
    labels = list(labels) if labels is not None else [f"ffid {s.params.get('ffid')}" for s in selections]
    all_rows = [block_rows(s) for s in selections]
    x_labels = [r.label for r in all_rows[0]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(x_labels) + 2), 4.0))
    xs = range(len(x_labels))
    for lb, rows in zip(labels, all_rows, strict=True):
        ax.plot(xs, [r.rate * 100 for r in rows], marker="o", markersize=3, linewidth=1, label=lb)
    ff = float(selections[0].params["ff"])
    ax.axhline(ff * 100, color="black", linestyle="--", linewidth=0.8, label=f"ff {ff:g}")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(x_labels, rotation=90, fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("selected (% of block parameters)")
    ax.set_title(f"{selections[0].selector}: selected fraction per block")
    ax.legend(fontsize=7, ncol=min(4, len(labels) + 1))
    fig.tight_layout()
    return save_figure(fig, path, fmt=fmt, dpi=120)


__all__ = [
    "FLAG_TOLERANCE",
    "BlockRow",
    "OverlapMatrix",
    "Summary",
    "block_rows",
    "flag_rate",
    "format_block_line",
    "manifest_rows",
    "overlap_matrix",
    "plot_coverage",
    "render_manifest_plain",
    "render_overlap_plain",
    "render_overlap_rich",
    "render_plain",
    "render_rich",
    "report_dict",
    "summarize",
]
