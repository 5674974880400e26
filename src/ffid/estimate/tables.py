"""Text output of ``ffid estimate``: the summary table, the per-part breakdown and the caveats."""

from __future__ import annotations

from collections.abc import Sequence

from .result import CONTEXT_BYTES, Estimate


def human_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'``; binary units, three significant figures."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """``26_434_560 -> '26.4M'``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


GPU_LABELS = {
    "base_resident": "base on GPU",
    "swap_in_flight": "swap in flight",
    "proxies": "proxies",
    "indices": "indices",
    "gradients": "grads",
    "optimizer": "optimizer",
    "workspace": "workspace",
    "grad_path": "grad path",
    "dequant_kept": "dequant kept",
    "inactive_expert": "other expert",
    "activations": "activations",
}
HOST_LABELS = {
    "swapped_blocks": "swapped blocks",
    "inactive_expert": "other expert",
    "expert_switch": "expert switch",
    "load_peak": "load peak",
}


def _fit_lines(estimates: Sequence[Estimate]) -> list[str]:
    """The ``--gpu-gb`` table: per ff, the fewest --blocks_to_swap that fit the card."""
    fits = [(e, e.fit) for e in estimates if e.fit is not None]
    if not fits:
        return []
    budget = fits[0][1].budget_bytes
    rows = [["ff", "fewest --blocks_to_swap", "GPU then", "+ context", "host RAM then", "verdict"]]
    for e, f in fits:
        rows.append(
            [
                f"{e.ff:g}",
                str(f.blocks_to_swap),
                human_bytes(f.gpu_bytes),
                human_bytes(f.gpu_bytes + CONTEXT_BYTES),
                human_bytes(f.host_bytes),
                "fits" if f.fits else f"does not fit even with {f.blocks_to_swap} swapped",
            ]
        )
    left_out = any("activations" not in e.gpu for e, _ in fits)
    caveat = "; activations NOT included, give --video_size/--frames or --activations-gb" if left_out else ""
    return [
        "",
        f"On a {human_bytes(budget)} card ({human_bytes(CONTEXT_BYTES)} kept for the CUDA context{caveat}):",
        *_table(rows, {1, 2, 3, 4}),
    ]


def format_estimates(estimates: Sequence[Estimate], source: str = "") -> str:
    """The summary table (as in the seed) followed by the per-part breakdown and the caveats."""
    if not estimates:
        return ""
    first = estimates[0]
    head = (
        f"{source or 'model'}: {first.total_params:,} params in {first.tensors_total} tensors"
        f"{f', {first.blocks} blocks' if first.blocks else ''}; selector {first.selector}, "
        f"optimizer {first.optimizer}, base {first.base_dtype} (compute {first.compute_dtype.lower()})"
        f"{f', blocks_to_swap {first.blocks_to_swap}' if first.blocks_to_swap else ''}"
        f"{'; both experts (--dit_high_noise)' if first.experts == 2 else ''}"
    )
    rows = [["ff", "trainable", "% of model", "GPU", "host RAM", "delta file", "use case"]]
    for e in estimates:
        rows.append(
            [
                f"{e.ff:g}",
                f"{e.trainable:,}",
                f"{100 * e.fraction:.3g}%",
                human_bytes(e.gpu_total),
                human_bytes(e.host_total),
                human_bytes(e.delta_file_bytes),
                e.hint,
            ]
        )
    lines = [head, "", *_table(rows, {1, 2, 3, 4, 5})]

    gpu_keys = [k for k in GPU_LABELS if any(k in e.gpu for e in estimates)]
    host_keys = [k for k in HOST_LABELS if any(k in e.host for e in estimates)]
    brows = [["ff", *(GPU_LABELS[k] for k in gpu_keys), "|", *(HOST_LABELS[k] for k in host_keys)]]
    for e in estimates:
        brows.append(
            [
                f"{e.ff:g}",
                *(human_bytes(e.gpu.get(k, 0)) for k in gpu_keys),
                "|",
                *(human_bytes(e.host.get(k, 0)) for k in host_keys),
            ]
        )
    lines += [
        "",
        "GPU parts | host parts:",
        *_table(brows, set(range(1, len(brows[0]))) - {len(gpu_keys) + 1}),
    ]
    lines += _fit_lines(estimates)
    notes = list(dict.fromkeys(n for e in estimates for n in e.notes))
    missing = list(dict.fromkeys(n for e in estimates for n in e.not_included))
    if missing:
        lines += ["", "Not included: " + "; ".join(missing) + "."]
    for n in notes:
        lines.append(f"Note: {n}.")
    return "\n".join(lines)
