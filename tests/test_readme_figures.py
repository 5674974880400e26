"""Every measured figure the README quotes is checked against the output that printed it.

``FIGURES`` is the table: what the figure is, a regex that finds it in the README (its groups are
the quoted values), the source (a results file under ``bench/results/``, another file of the repo,
or a cheap ``ffid`` command), and a reader that gives the values the source says, formatted as the
README writes them. Changing a figure in the README, or a results file without the README, fails
``test_readme_figure``.

Every results file the README names is named with its date, ``(`bench/results/NAME`, DATE)``,
and that date must be the run's: the ``Date:`` line of a file saved by ``bench/record.py``, else
the entry in ``bench/results/dates.json`` (when that run's results were committed).

To add a figure: save the script's output (its own results file, or ``python bench/record.py
NAME -- COMMAND``), quote it in the README with the file and date, and add a row here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"


# ---------------------------------------------------------------- reading sources


@cache
def text(rel: str) -> str:
    if rel.startswith("ffid "):  # a cheap command whose output is the source (plans from shapes)
        out = subprocess.run(
            [sys.executable, "-m", "ffid", *rel.split()[1:]],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout
    return (ROOT / rel).read_text(encoding="utf-8")


def md_tables(src: str) -> list[list[dict[str, str]]]:
    """Every markdown table of ``src``: rows as {header: cell}; a repeated header gets ``#2``."""
    tables, lines = [], text(src).splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            heads: list[str] = []
            for h in cells(lines[i]):
                heads.append(h if h not in heads else f"{h}#2")
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(heads, cells(lines[i]), strict=False)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def row(src: str, first_head: str, key: str) -> dict[str, str]:
    """The row whose first cell is ``key`` in the table whose first header is ``first_head``."""
    for t in md_tables(src):
        if t and next(iter(t[0])) == first_head:
            for r in t:
                if r[first_head] == key:
                    return r
    raise KeyError(f"{src}: no row {key!r} in a table headed {first_head!r}")


def table(src: str, first_head: str) -> list[dict[str, str]]:
    for t in md_tables(src):
        if t and next(iter(t[0])) == first_head:
            return t
    raise KeyError(f"{src}: no table headed {first_head!r}")


def recorded_json(src: str) -> dict:
    """A file of ``bench/record.py`` whose command printed JSON."""
    body = text(src).split("\n\n", 1)[1]
    return json.loads(body)


def search(src: str, pattern: str) -> re.Match:
    m = re.search(pattern, text(src), re.M)
    assert m, f"{src}: nothing matches {pattern!r}"
    return m


def first_number(cell: str) -> str:
    return cell.split()[0]


def pct(x: float) -> str:
    return f"{x:.1f}"


# ---------------------------------------------------------------- the figures

COMPARE = "bench/results/compare-cpu.md"
INTERF = "bench/results/interference-cpu-seed0.md"
WEIGHT1 = "bench/results/interference-cpu-seed0-weight1.md"
DELTA = "bench/results/delta-size-wan22-14b.txt"
ESTIMATE = "bench/results/estimate-check-cpu.txt"
MERGE = "bench/results/merge-cpu.txt"
PROJ_COST = "bench/results/projection-cost-cpu.md"
STACK = "bench/results/stack-{}.md"
GRID = "bench/results/projection-grid-w128.md"
SUMMARY = "method"  # first header of bench/stack.py's summary table
PLAN_ROWS = "ffid plan wan2.2-t2v-14b --ff 0.01 --ffid 1 --selector rows --include ^blocks\\."
PLAN_SPREAD = "ffid plan wan2.2-t2v-14b --ff 0.01 --ffid 1"
PLAN_COMPAT = "ffid plan wan2.2-t2v-14b --ff 0.001 --ffid 1 --selector compat-v2"
ESTIMATE_BARE = "ffid estimate wan2.2-t2v-14b --ff 0.01"
ESTIMATE_CAPTIONS = "ffid estimate wan2.2-t2v-14b --ff 0.01 --captions 30 --caption_tokens 60"


@dataclass(frozen=True)
class Figure:
    what: str
    readme: str  # regex (multiline) with one group per quoted value
    source: str  # repo-relative file, or an "ffid ..." command
    read: Callable[[], tuple[str, ...]]  # the values the source gives, as the README writes them


def _compare_row(readme_label: str, label: str) -> Figure:
    """One row of the README's comparison table against bench/compare.py's tables."""

    def read() -> tuple[str, ...]:
        r = row(COMPARE, "method", label)
        best = "-" if label == "floor" else _best_lr(label)
        return (
            r["trainable"].split(" (")[0],
            r["vs floor"],
            r["vs LoRA"],
            r["above model"],
            r["optimizer state"],
            r["output file"],
            r["loss after N"],
            best,
        )

    return Figure(
        f"compare table: {readme_label}",
        rf"^\| {re.escape(readme_label)} " + r"\| (.+?) " * 8 + r"\|$",
        COMPARE,
        read,
    )


def _lr_grid() -> list[dict[str, str]]:
    for t in md_tables(COMPARE):
        if t and "lr 0.001" in t[0]:
            return t
    raise KeyError("no learning-rate table")


def _best_lr(label: str) -> str:
    r = next(r for r in _lr_grid() if r["method"] == label)
    head, cell = next((h, c) for h, c in r.items() if c.startswith("**"))
    lr = f"{float(head.split()[1]):.0e}".replace("e-0", "e-")
    return f"{cell.strip('*')} ({lr})"


def _compare(label: str, col: str) -> str:
    return row(COMPARE, "method", label)[col]


def _sizes(size: str, col: str) -> str:
    return row(COMPARE, "size", size)[col]


def _interf(method: str, col: str, src: str = INTERF) -> str:
    return row(src, "method", method)[col]


def _demo_rows() -> list[Figure]:
    methods = ("ffid plain", "ffid rehearsed", "ffid preserved")

    def stage(col: str, i: int) -> Callable[[], tuple[str, ...]]:
        return lambda: tuple(_interf(m, col).split(" → ")[i] for m in methods)

    def base() -> tuple[str, ...]:
        return tuple(
            " → ".join(_interf(m, "base classes before / 3a / 3b").split(" / ")[1:]) for m in methods
        )

    three = r"\| \**(.+?)\** \| \**(.+?)\** \| \**(.+?)\** \|$"
    return [
        Figure(
            "demo: character1 after 3a",
            r"^\| character1 after training it [^|]+" + three,
            INTERF,
            stage("character1 before → 3a → 3b", 1),
        ),
        Figure(
            "demo: character1 after 3b",
            r"^\| character1 after character2 was trained " + three,
            INTERF,
            stage("character1 before → 3a → 3b", 2),
        ),
        Figure(
            "demo: share kept",
            r"^\| share of character1's gain kept " + three,
            INTERF,
            lambda: tuple(_interf(m, "char1 retention") for m in methods),
        ),
        Figure(
            "demo: character2",
            r"^\| character2 \(`--ffid 2`, on top\) " + three,
            INTERF,
            stage("character2 before → 3b", 1),
        ),
        Figure("demo: base classes", r"^\| base classes after 3a → after 3b " + three, INTERF, base),
    ]


def _stack(stem: str, method: str) -> dict[str, str]:
    return row(STACK.format(stem), SUMMARY, method)


def _grid_span(column: str) -> tuple[str, str]:
    """The smallest and largest magnitude of a points column over the grid's validation runs."""
    rows = [r for t in md_tables(GRID)[1:] for r in t]  # the tables after the development one
    values = sorted(abs(float(r[column])) for r in rows)
    return f"{values[0]:.0f}", f"{values[-1]:.0f}"


def _kept_span(r: dict[str, str]) -> tuple[str, str]:
    kept = [int(v) for v in re.findall(r"\d: (-?\d+)%", r["retention (confident) by character"])]
    return str(min(kept)), str(max(kept))


def _stack_cells(stem: str, method: str) -> tuple[str, ...]:
    r = _stack(stem, method)
    after_all = r["mean confident, after all"].replace("–", "-").replace("%]", "]")
    kept = " / ".join(re.findall(r"\d: (-?\d+%)", r["retention (confident) by character"]))
    base = r["base classes before / after char1 / after all"].split(" / ")
    return first_number(r["mean confident, after own runs"]), after_all, kept, f"{base[0]} -> {base[2]}"


def _stack_rows() -> list[Figure]:
    out = []
    for label, stem in (
        ("seed 0, digits 7 4 1 9", "w128-seed0"),
        ("seed 1, digits 7 4 1 9", "w128-seed1"),
        ("seed 2, digits 7 4 1 9", "w128-seed2"),
        ("seed 0, digits 2 5 3 8", "w128-set2-seed0"),
        ("seed 1, digits 2 5 3 8", "w128-set2-seed1"),
        ("seed 2, digits 2 5 3 8", "w128-set2-seed2"),
    ):
        four = r"\| (.+?) \| \**(.+?)\** \| \**(.+?)\** \| (.+?) \|"
        out.append(
            Figure(
                f"stack table: {label}",
                rf"^\| {label} \| ffid projection[^|]*{four}\n\| \| LoRA sequential[^|]*{four}$",
                STACK.format(stem),
                lambda stem=stem: (
                    _stack_cells(stem, "ffid projection") + _stack_cells(stem, "LoRA sequential")
                ),
            )
        )
    return out


STACK_W128 = tuple(f"w128-{d}seed{i}" for d in ("", "set2-") for i in range(3))


def _lead_over_lora() -> tuple[str, ...]:
    leads = [
        float(search(STACK.format(s), r"LoRA sequential \+ 20 points: \d+%, \+([\d.]+) points").group(1))
        for s in STACK_W128
    ]
    lora = [
        int(first_number(_stack(s, "LoRA sequential")["mean confident, after all"]).rstrip("%"))
        for s in STACK_W128
    ]
    return f"{min(leads):.0f}", f"{max(leads):.0f}", str(min(lora)), str(max(lora))


def _budget_ratio(stem: str = "w128-seed0") -> tuple[str, ...]:
    src = STACK.format(stem)
    proj = int(search(src, r"preserve_method projection.*trainable (\d+)\.").group(1))
    plain = int(search(src, r"\(([\d,]+) weights each\)").group(1).replace(",", ""))
    return (f"{proj / plain:.0f}",)


def _double_budget() -> tuple[str, ...]:
    """Projection at ff 0.02 (2x LoRA's count): own-run gaps, lead after four, lowest/highest kept."""
    stems = ("w128-set2-seed1-ff002", "w128-seed0-ff002")
    gaps, leads, kept = [], [], []
    for stem in stems:
        m = search(STACK.format(stem), r"after own runs ([+-][\d.]+) points.*after all \+([\d.]+) points")
        gaps.append(m.group(1))
        leads.append(float(m.group(2)))
        kept += [int(k) for k in _kept_span(_stack(stem, "ffid projection"))]
    ratio = _budget_ratio("w128-seed0-ff002")[0]
    return ratio, *gaps, f"{min(leads):.0f}", f"{max(leads):.0f}", str(min(kept)), str(max(kept))


def _share_range() -> tuple[str, ...]:
    shares = [float(r["share of a 300-step run"].rstrip("%")) for r in table(PROJ_COST, "width")]
    return f"{min(shares):.1f}", f"{max(shares):.1f}"


def _delta(key: str) -> float:
    return recorded_json(DELTA)[key]


def _estimate_exact() -> tuple[str, ...]:
    """'to the byte' when every memory column's estimate equals the measurement; the delta's gap."""
    rows = table(ESTIMATE, "model")
    memory = ("base", "proxies", "gradients", "optimizer", "indices", "workspace")
    exact = all(len(set(r[f"{k} est/meas"].split(" (")[0].split(" / "))) == 1 for r in rows for k in memory)
    gap = max(
        abs(1 - int(a.replace(",", "")) / int(b.replace(",", "")))
        for a, b in (r["delta est/meas"].split(" (")[0].split(" / ") for r in rows)
    )
    return ("to the byte" if exact else "not to the byte", f"{100 * gap:.1f}")


def _merge(pattern: str) -> Callable[[], tuple[str, ...]]:
    return lambda: search(MERGE, pattern).groups()


def _gpu_kit_limit() -> tuple[str, ...]:
    parts = search("bench/gpu/run.sh", r'^PARTS="([^"]+)"').group(1).split()
    return (str(sum(int(p.split(":")[2]) for p in parts)),)


def _plan_projection() -> tuple[str, ...]:
    bases = float(search(PLAN_ROWS, r"at most ([\d.]+) GiB fp32").group(1))
    grams = float(search(PLAN_ROWS, r"Grams ([\d.]+) GiB").group(1))
    rtx_min = int(search(PLAN_ROWS, r"RTX 4090 ~(\d+) min").group(1))
    return (
        f"{bases:.1f}",
        search(PLAN_ROWS, r"(\d+) DiT forwards").group(1),
        search(PLAN_ROWS, r"([\d,]+) of them sampled into each Gram").group(1),
        f"{grams:.0f}",
        search(PLAN_ROWS, r"H100 SXM ~(\d+) min").group(1),
        f"{rtx_min}",
    )


FIGURES: list[Figure] = [
    # bench/compare.py
    *(
        _compare_row(readme, label)
        for readme, label in (
            ("floor (frozen, backward to input)", "floor"),
            ("full finetuning", "full"),
            ("original (compat-v2 whole tensors)", "original"),
            ("ffid ff 0.001", "ffid@0.001"),
            ("ffid ff 0.01", "ffid@0.01"),
            ("ffid ff 0.05", "ffid@0.05"),
            ("PEFT LoRA r=1", "lora"),
            ("PEFT SHiRA r=1", "shira"),
        )
    ),
    Figure(
        "compare: wall time",
        r"the lr grid: (\d+) s wall",
        COMPARE,
        lambda: (search(COMPARE, r"Wall time (\d+) s").group(1),),
    ),
    Figure(
        "compare: step time vs LoRA",
        r"step time: ([\d.]+x) LoRA \(([\d.]+) vs ([\d.]+) ms\)",
        COMPARE,
        lambda: (
            _compare("ffid@0.01", "vs LoRA"),
            _compare("ffid@0.01", "step ms"),
            _compare("lora", "step ms"),
        ),
    ),
    Figure(
        "compare: memory vs LoRA",
        r"memory: \+([\d.]+) MiB;",
        COMPARE,
        lambda: (
            pct(
                float(first_number(_compare("ffid@0.01", "above model")))
                - float(first_number(_compare("lora", "above model")))
            ),
        ),
    ),
    Figure(
        "compare: best-rate loss",
        r"best learning rate: ([\d.]+)% higher \(([\d.]+) against ([\d.]+)\); "
        r"at one\s+shared rate, ([\d.]+)% higher",
        COMPARE,
        lambda: (
            pct(100 * (float(_best_lr("ffid@0.01").split()[0]) / float(_best_lr("lora").split()[0]) - 1)),
            _best_lr("ffid@0.01").split()[0],
            _best_lr("lora").split()[0],
            pct(
                100
                * (float(_compare("ffid@0.01", "loss after N")) / float(_compare("lora", "loss after N")) - 1)
            ),
        ),
    ),
    Figure(
        "compare: ff 0.05",
        r"lowest loss of all adapters \(([\d.]+)\) at ([\d.]+x) LoRA",
        COMPARE,
        lambda: (_best_lr("ffid@0.05").split()[0], _compare("ffid@0.05", "vs LoRA")),
    ),
    Figure(
        "compare: size sweep",
        r"falls from ([\d.]+x) to ([\d.]+x) to ([\d.]+x)\s+at 36K",
        COMPARE,
        lambda: tuple(_sizes(s, "ffid/floor") for s in ("tiny", "s", "m")),
    ),
    Figure(
        "compare: faster than LoRA at 6.9M",
        r"faster than LoRA \(([\d.]+x) vs ([\d.]+x) the floor\)",
        COMPARE,
        lambda: (_sizes("m", "ffid/floor"), _sizes("m", "LoRA/floor")),
    ),
    # bench/interference.py on the demo's task, seed 0
    *_demo_rows(),
    Figure(
        "demo: preserved step cost",
        r"preserved step costs\s+([\d.]+x) a plain one and ([\d.]+x) its memory",
        INTERF,
        lambda: (
            _interf("ffid preserved", "step vs plain"),
            _interf("ffid preserved", "above-loaded vs plain"),
        ),
    ),
    Figure(
        "demo: preservation weight 1 and 16",
        r"weight 1 kept\s+(\d+%) \(.*?\), weight 16 (\d+%)",
        WEIGHT1,
        lambda: (
            _interf("ffid preserved", "char1 retention", WEIGHT1),
            _interf("ffid preserved", "char1 retention"),
        ),
    ),
    # bench/stack.py and bench/projection_cost.py
    Figure(
        "stack: plain at width 64",
        r"plain ffid at the demo's width keeps (-?\d+%), (-?\d+%) and (-?\d+%)",
        STACK.format("w64-seed0"),
        lambda: tuple(
            re.findall(
                r"\d: (-?\d+%)", _stack("w64-seed0", "ffid plain")["retention (confident) by character"]
            )
        ),
    ),
    Figure(
        "projection: feature pass share",
        r"feature pass took ([\d.]+)-([\d.]+)% of a run",
        PROJ_COST,
        _share_range,
    ),
    *_stack_rows(),
    Figure(
        "stack: lead over LoRA",
        r"ends (\d+)-(\d+) points\s+above LoRA.*?LoRA itself keeps\s+(\d+)-(\d+)%",
        STACK.format("w128-seed0"),
        _lead_over_lora,
    ),
    Figure(
        "stack: budget",
        r"Projection's budget is (\d+)x LoRA's trainable count",
        STACK.format("w128-seed0"),
        _budget_ratio,
    ),
    Figure(
        "stack: twice LoRA's budget",
        r"At (\d+)x \(`--projection-ff 0.02`.*?\(([+-][\d.]+) and\s+([+-][\d.]+) points after own runs"
        r".*?ended (\d+)-(\d+) points above it after four, keeping\s+(\d+)-(\d+)% of every gain",
        STACK.format("w128-seed0-ff002"),
        _double_budget,
    ),
    Figure(
        "stack: width 64 character1",
        r"\((\d+%) and (\d+%) of its gain on seeds 0 and 1;",
        STACK.format("w64-seed0"),
        lambda: tuple(
            re.match(r"1: (\d+%)", _stack(s, "ffid projection")["retention (confident) by character"]).group(
                1
            )
            for s in ("w64-seed0", "w64-seed1")
        ),
    ),
    Figure(
        "stack: the rule's rate at LoRA's budget, validated",
        r"ends (\d+)-(\d+) points above LoRA sequential after four\s+characters, while learning (\d+)-(\d+) "
        r"points less",
        GRID,
        lambda: _grid_span("after all minus LoRA (points)") + _grid_span("own minus LoRA (points)"),
    ),
    Figure(
        "stack: width 256 at LoRA's budget",
        r"width 256 the same budget at the recipe's rate learns (\d+%) and keeps (\d+)-(\d+)% of every gain",
        STACK.format("w256-seed0-ff001"),
        lambda: (
            first_number(_stack("w256-seed0-ff001", "ffid projection")["mean confident, after own runs"]),
            *_kept_span(_stack("w256-seed0-ff001", "ffid projection")),
        ),
    ),
    # ffid plan on the preset's shapes (computed, exact)
    Figure(
        "plan: ff 0.01 at 14B",
        r"which ([\d,]+) weights id 1 trains",
        PLAN_SPREAD,
        lambda: (search(PLAN_SPREAD, r"Target: ([\d,]+) params").group(1),),
    ),
    Figure(
        "plan: compat-v2 at 14B",
        r"\((\d+) tensors / ([\d,]+) params at\s+`--ff 0.001 --ffid 1`",
        PLAN_COMPAT,
        lambda: (
            search(PLAN_COMPAT, r"Tensors touched: (\d+) /").group(1),
            search(PLAN_COMPAT, r"selected: ([\d,]+) params").group(1),
        ),
    ),
    Figure(
        "plan: projection at 14B",
        r"bounds the bases at ([\d.]+) GiB fp32.*?feature pass at (\d+) DiT\s+forwards.*?of ([\d,]+) sampled"
        r"\s+video tokens.*?holding\s+([\d.]+) GiB.*?~(\d+) min on an H100, ~(\d+) min on an RTX 4090",
        PLAN_ROWS,
        _plan_projection,
    ),
    Figure(
        "estimate: delta size with stored text encodings",
        r"`--captions 30 --caption_tokens 60` counts them in the delta size \(([\d.]+ GiB) ->\s+([\d.]+ GiB) "
        r"at 14B ff 0.01\)",
        ESTIMATE_CAPTIONS,
        lambda: tuple(
            search(src, r"^0\.01 .*?([\d.]+ GiB)\s+several").group(1)
            for src in (ESTIMATE_BARE, ESTIMATE_CAPTIONS)
        ),
    ),
    # bench/delta_size.py
    Figure(
        "delta: bytes per element (idea)",
        r"delta file \(about (\d+) bytes per trained weight",
        DELTA,
        lambda: (f"{_delta('explicit_f32_bytes_per_element'):.0f}",),
    ),
    Figure(
        "delta: sizes",
        r"about (\d+) bytes per trained element\.\s+At ff 0.01, a 14B Wan model gives about "
        r"([\d.]+) GB.*?values only, in the model's dtype.*?: ([\d.]+) bytes per element, "
        r"(\d+) MB for Wan 2.2 14B at ff 0.01, rebuilt in ([\d.]+) s",
        DELTA,
        lambda: (
            f"{_delta('explicit_f32_bytes_per_element'):.0f}",
            f"{_delta('explicit_f32_bytes') / 1e9:.1f}",
            f"{_delta('implicit_bf16_bytes_per_element'):.1f}",
            f"{_delta('implicit_bf16_bytes') / 1e6:.0f}",
            f"{_delta('rebuild_total_s_estimate'):.1f}",
        ),
    ),
    Figure(
        "comfyui: node memory",
        r"about the delta file's size: ([\d.]+) GiB for Wan 14B",
        DELTA,
        lambda: (f"{_delta('explicit_f32_bytes') / 2**30:.2f}",),
    ),
    # bench/estimate_check.py
    Figure(
        "estimate: checked against the engine",
        r"Every memory part matches\s+(to the byte); the delta file "
        r"size is within ([\d.]+)%",
        ESTIMATE,
        _estimate_exact,
    ),
    # bench/gpu/run.sh: the kit's time limits (a budget, not a measurement)
    Figure(
        "gpu kit: time limits",
        r"its parts' time limits add up to (\d+) s",
        "bench/gpu/run.sh",
        _gpu_kit_limit,
    ),
]


def _best(label: str) -> str:
    """The best (lowest) of bench/merge.py's timed runs of ``label``, as it prints them."""
    times = search(MERGE, rf"^{re.escape(label)}:\s+(.+?)  ->").group(1)
    return f"{min(float(t.split()[0]) for t in times.split(', ')):.2f}"


FIGURES += [
    Figure(
        "merge: the checkpoint",
        r"runs on a ([\d.]+) GB bf16 checkpoint with the Wan 1.3B layout\s+and a delta of ff 0.01 touching "
        r"all (\d+) tensors",
        MERGE,
        lambda: (
            search(MERGE, r"^base: ([\d.]+) GB bf16").group(1),
            search(MERGE, r"in (\d+) of \d+ tensors").group(1),
        ),
    ),
    Figure(
        "merge: against cp",
        r"`ffid merge` ran at ([\d.]+) of `cp`'s speed \(best ([\d.]+) s against ([\d.]+) s\); the\s+"
        r"library call `ffid.merge_checkpoint` ran at ([\d.]+) \(([\d.]+) s\)",
        MERGE,
        lambda: (
            search(MERGE, r"cp speed = ([\d.]+) for the `ffid merge` command").group(1),
            _best("merge"),
            _best("cp"),
            search(MERGE, r"cp speed = [\d.]+ for the `ffid merge` command, ([\d.]+) for the library").group(
                1
            ),
            _best("merge_checkpoint() in-process (no interpreter start-up)"),
        ),
    ),
    Figure(
        "merge: against a durable copy",
        r"\(`cp` then `sync FILE`\): ([\d.]+) for the command and ([\d.]+) for the\s+library",
        MERGE,
        lambda: search(
            MERGE, r"durable cp \(cp \+ sync\) speed = ([\d.]+) for the command, ([\d.]+) for"
        ).groups(),
    ),
    Figure(
        "merge: peak memory",
        r"peak RSS: (\d+) MiB, ([\d.]+)x the largest tensor, for a (\d+) MiB checkpoint",
        MERGE,
        lambda: search(
            MERGE,
            r"merge peak RSS (\d+) MiB .*\(([\d.]+) x the largest tensor; the checkpoint is (\d+) MiB\)",
        ).groups(),
    ),
]


DEMO_FRESH = "bench/results/demo-fresh-cpu.txt"


DEMO_STACK3 = "bench/results/demo-stack3-fresh-cpu.txt"


def _time_v(path: str) -> tuple[str, ...]:
    """Wall time and peak RSS of a run, as /usr/bin/time -v printed them into ``path``."""
    wall = search(path, r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):([\d.]+)$")
    kb = int(search(path, r"Maximum resident set size \(kbytes\): (\d+)$").group(1))
    minutes, seconds = int(wall.group(1)), float(wall.group(2))
    return f"{minutes} min {seconds:.0f} s", f"{kb / 1024:.0f}"


DEMO_PAIR = "bench/results/demo-pair-fresh-cpu.txt"
DEMO_PARALLEL = "bench/results/demo-parallel-seed0-cpu.md"


def _kept(path: str, stage: str, which: tuple[int, ...], interval: bool = False) -> tuple[str, ...]:
    """Characters' shares of their confident gain kept, as a stacked demo's report.md gives them."""
    line = search(path, rf"^Share of each character's confident gain kept \({stage}\): (.*)$").group(1)
    out: list[str] = []
    for i in which:
        m = re.search(rf"character{i} (-?\d+)% \[(-?\d+)–(-?\d+)%\]", line)
        assert m, f"{path}: no share for character{i} in {line!r}"
        out += [m.group(1), m.group(2), m.group(3)] if interval else [m.group(1)]
    return tuple(out)


def _demo_seed(seed: int) -> Figure:
    """A row of the README's table of the default demo on three seeds: each earlier character's
    share kept (protected, with its interval) and the unprotected contrast's."""
    path = f"bench/results/demo-seed{seed}-cpu.md"
    return Figure(
        f"demo: seed {seed}",
        rf"^\| {seed} \| [^|]+\| \**(\d+)%\** \[(\d+)–(\d+)\] / \**(\d+)%\** \[(\d+)–(\d+)\] \|"
        rf"[^|]+\|[^|]+\| (\d+)% \[(\d+)–(\d+)\] / (\d+)% \[(\d+)–(\d+)\] \|$",
        path,
        lambda: _kept(path, "merged file", (1, 2), True) + _kept(path, "after character3", (1, 2), True),
    )


def _demo_fresh() -> tuple[str, ...]:
    """The fresh default demo's wall time and peak RSS."""
    return _time_v(DEMO_FRESH)


FIGURES += [
    Figure(
        "demo: a fresh default run with the shipped base",
        r"took \**(\d+ min \d+ s)\** wall\** and \**(\d+) MiB\** peak RSS",
        DEMO_FRESH,
        _demo_fresh,
    ),
    Figure(
        "demo --pair: a fresh run with its shipped base",
        r"A fresh `ffid demo --pair`.*?took \**(\d+ min \d+ s)\** wall and \**(\d+) MiB\** peak RSS",
        DEMO_PAIR,
        lambda: _time_v(DEMO_PAIR),
    ),
    *(_demo_seed(seed) for seed in (0, 1, 2)),
    Figure(
        "stack: full finetuning sequential, seed 0, width 128",
        r"Full finetuning sequential, on seed 0, ends at (\d+)% \[(\d+)-(\d+)\] after all four",
        STACK.format("w128-seed0-full"),
        lambda: tuple(
            re.match(
                r"(\d+)% \[(\d+)–(\d+)%\]",
                _stack("w128-seed0-full", "full FT sequential")["mean confident, after all"],
            ).groups()
        ),
    ),
    Figure(
        "demo: parallel + merge, seed 0",
        r"characters 1 and 3 kept (\d+)% and (\d+)% of their gains\s+\(`bench/results/demo-parallel-seed0",
        DEMO_PARALLEL,
        lambda: _kept(DEMO_PARALLEL, "merged file", (1, 3)),
    ),
    Figure(
        "demo: a fresh three-character run with its shipped base",
        r"takes \**(\d+ min \d+ s)\** wall and \**(\d+) MiB\** peak RSS \(`bench/results/demo-stack3",
        DEMO_STACK3,
        lambda: _time_v(DEMO_STACK3),
    ),
]


# ---------------------------------------------------------------- the tests


def check(readme: str, f: Figure) -> None:
    m = re.search(f.readme, readme, re.M | re.S)
    assert m, f"README no longer quotes {f.what!r} as {f.readme!r}: update the README or this table"
    quoted = tuple(g.replace("**", "") for g in m.groups() if g is not None)  # bold is not the figure
    expected = f.read()
    assert quoted == expected, (
        f"{f.what}: the README says {quoted}, {f.source} says {expected}; rerun or requote, "
        f"and update the date the README gives for the file"
    )


@pytest.mark.parametrize("f", FIGURES, ids=lambda f: f.what)
def test_readme_figure(f: Figure) -> None:
    check(README.read_text(encoding="utf-8"), f)


def recorded_date(name: str) -> str:
    path = RESULTS / name
    m = re.search(r"^Date: (\d{4}-\d\d-\d\d)$", path.read_text(encoding="utf-8"), re.M)
    if m:
        return m.group(1)
    dates = json.loads((RESULTS / "dates.json").read_text(encoding="utf-8"))
    assert name in dates, f"bench/results/{name} has no Date: line and no entry in bench/results/dates.json"
    return dates[name]


def test_results_files_are_named_with_their_date() -> None:
    readme = README.read_text(encoding="utf-8")
    named = set(re.findall(r"`bench/results/([\w.-]+)`", readme))
    for f in FIGURES:
        if f.source.startswith("bench/results/"):
            assert f.source.split("/")[-1] in named, f"README quotes {f.what!r} without naming {f.source}"
    for name in sorted(named):
        assert (RESULTS / name).exists(), f"README names bench/results/{name}, which does not exist"
        dated = re.findall(rf"`bench/results/{re.escape(name)}`,\s+(\d{{4}}-\d\d-\d\d)", readme)
        assert dated, (
            f"README names bench/results/{name} without its date: write (`bench/results/{name}`, DATE)"
        )
        want = recorded_date(name)
        assert set(dated) == {want}, (
            f"README dates bench/results/{name} {sorted(set(dated))}, the run was {want}"
        )


def test_no_hand_typed_test_counts() -> None:
    """Test counts and suite times are printed by pytest, not kept in the README."""
    readme = README.read_text(encoding="utf-8")
    assert not re.search(r"\b\d+ (passed|tests pass|slow ones)\b", readme)


# ---------------------------------------------------------------- the checker itself


def test_a_changed_readme_figure_fails() -> None:
    readme = README.read_text(encoding="utf-8")
    for f in FIGURES:
        m = re.search(f.readme, readme, re.M | re.S)
        assert m
        i = next(i for i, g in enumerate(m.groups(), 1) if g and re.search(r"\d", g))
        digit = re.search(r"\d", m.group(i))
        assert digit
        j = m.start(i) + digit.start()
        changed = readme[:j] + str((int(readme[j]) + 1) % 10) + readme[j + 1 :]
        with pytest.raises(AssertionError):
            check(changed, f)


def test_a_changed_results_file_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = README.read_text(encoding="utf-8")
    f = next(f for f in FIGURES if f.what == "compare: step time vs LoRA")
    check(readme, f)
    original = text(COMPARE)
    text.cache_clear()
    real = text.__wrapped__

    def patched(rel: str) -> str:
        out = real(rel)
        return out.replace("| 103.5 |", "| 104.5 |") if rel == COMPARE else out

    monkeypatch.setattr(sys.modules[__name__], "text", cache(patched))
    assert "| 103.5 |" in original
    with pytest.raises(AssertionError):
        check(readme, f)
