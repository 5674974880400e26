"""Do tiles pay? The selected-gradient product of one weight, element spread against tiled (issue 15).

Run: ``python bench/tiles.py`` (one torch thread, process CPU time, best of ``--repeat``).

For one ``[R, C]`` matmul weight (Wan-like 512x512 and 1024x1024), ``N`` tokens, bf16 or fp32
operands (what autocast hands the backward) and density ``d`` (``k = d R C`` selected entries),
it times the proxy gradient, the selected entries of ``a^T b`` (``a`` ``[N, R]``, ``b`` ``[N, C]``),
fp32 accumulation, every way this bench knows:

- ``sampled``: today's path, CSR SDDMM over token chunks, on an element-spread pattern
  (``ffid.engine.paths.sampled``);
- ``dense`` / ``chunked``: the product in the compute dtype, then a gather (``paths.dense`` /
  ``paths.chunked``);
- ``csr-8x8``: the same SDDMM on a pattern of 8x8 tiles (the CSR kernel computes each entry's dot
  product on its own, so grouping alone cannot help it; a control);
- ``tiles HxW``: the same number of entries grouped in ``k / (H W)`` tiles of ``H x W`` (4x4, 8x8,
  16x16 and 1x16 row strips) at distinct random tile positions, computed as one batched small
  matmul per token chunk: the tiles' row blocks of ``a`` and column blocks of ``b`` gathered
  (``[n, T, H]`` and ``[n, T, W]``, fp32) and ``bmm`` to ``[T, H, W]``, accumulated over the
  chunks (the same chunk budget as ``sampled``). A BSR ``torch.sparse.sampled_addmm`` is not
  implemented on the CPU (torch refuses a BSR input; the BSR SDDMM that exists is a CUDA Triton
  kernel), so this is the block-sparse kernel the CPU has.

Every row reports milliseconds for ``sampled`` and each alternative as a multiple of it (below
1 = faster than today's path). Results (and the verdict) are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from ffid.engine import paths

TILES = ((4, 4), (8, 8), (16, 16), (1, 16))


def _timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def spread_pattern(rows: int, cols: int, count: int, g: torch.Generator) -> paths.Pattern:
    flat = torch.randperm(rows * cols, generator=g)[:count].sort().values
    return paths.Pattern(lambda: flat, count, rows * cols, False).matrix(rows, cols)


def tile_positions(
    rows: int, cols: int, count: int, th: int, tw: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-block and column-block index of ``round(count / (th tw))`` distinct random tiles."""
    grid_r, grid_c = rows // th, cols // tw
    n = max(1, round(count / (th * tw)))
    pick = torch.randperm(grid_r * grid_c, generator=g)[:n].sort().values
    return pick // grid_c, pick % grid_c


def tiled_pattern(
    rows: int, cols: int, rb: torch.Tensor, cb: torch.Tensor, th: int, tw: int
) -> paths.Pattern:
    """The flat positions of the tiles' entries, as a CSR pattern (for ``csr-HxW``)."""
    r = (rb[:, None, None] * th + torch.arange(th)[None, :, None]).expand(-1, th, tw)
    c = (cb[:, None, None] * tw + torch.arange(tw)[None, None, :]).expand(-1, th, tw)
    flat = (r * cols + c).reshape(-1).sort().values
    return paths.Pattern(lambda: flat, flat.numel(), rows * cols, False).matrix(rows, cols)


def tiles_grad(
    a: torch.Tensor, b: torch.Tensor, rb: torch.Tensor, cb: torch.Tensor, th: int, tw: int
) -> torch.Tensor:
    """``[T, th, tw]`` fp32: the tiles of ``a^T b``, one batched matmul per token chunk."""
    n, rows = a.shape
    cols = b.shape[1]
    tiles = rb.numel()
    out = torch.zeros(tiles, th, tw, dtype=torch.float32)
    a3, b3 = a.view(n, rows // th, th), b.view(n, cols // tw, tw)
    budget = paths.SAMPLED_CHUNK_BYTES["cpu"]
    step = max(64, budget // (4 * tiles * (th + tw)))
    for s in range(0, n, step):
        at = a3[s : s + step].index_select(1, rb).permute(1, 2, 0).float().contiguous()  # [T, th, n]
        bt = b3[s : s + step].index_select(1, cb).permute(1, 0, 2).float().contiguous()  # [T, n, tw]
        out.baddbmm_(at, bt)
    return out


def one(rows: int, cols: int, n: int, dtype: torch.dtype, density: float, repeat: int, seed: int = 0) -> dict:
    """Every approach for one configuration: seconds per call."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rows, generator=g).to(dtype)
    b = torch.randn(n, cols, generator=g).to(dtype)
    count = round(density * rows * cols)
    spread = spread_pattern(rows, cols, count, g)
    spread.crow("cpu")
    t = {"sampled": _timed(lambda: paths.sampled(spread, a, b), repeat)}
    t["dense"] = _timed(lambda: paths.dense(spread, a, b), repeat)
    t["chunked"] = _timed(lambda: paths.chunked(spread, a, b), repeat)
    for th, tw in TILES:
        rb, cb = tile_positions(rows, cols, count, th, tw, g)
        if (th, tw) == (8, 8):
            csr = tiled_pattern(rows, cols, rb, cb, th, tw)
            csr.crow("cpu")
            t["csr-8x8"] = _timed(lambda csr=csr: paths.sampled(csr, a, b), repeat)
        t[f"tiles {th}x{tw}"] = _timed(
            lambda rb=rb, cb=cb, th=th, tw=tw: tiles_grad(a, b, rb, cb, th, tw), repeat
        )
    return t


def check(seed: int = 0) -> None:
    """The tile kernel and the tiled CSR pattern give the entries of the dense product."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(300, 64, generator=g), torch.randn(300, 48, generator=g)
    full = a.t() @ b
    for th, tw in TILES:
        rb, cb = tile_positions(64, 48, 200, th, tw, g)
        got = tiles_grad(a, b, rb, cb, th, tw)
        want = torch.stack(
            [full[r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r, c in zip(rb, cb, strict=True)]
        )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        pat = tiled_pattern(64, 48, rb, cb, th, tw)
        torch.testing.assert_close(
            paths.sampled(pat, a, b), full.reshape(-1)[pat.host()], atol=1e-4, rtol=1e-4
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=int, nargs="+", default=[512, 1024], help="square weights R = C")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    p.add_argument("--density", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--repeat", type=int, default=3, help="best of this many timed calls")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    check()
    names = ["dense", "chunked", "csr-8x8", *(f"tiles {h}x{w}" for h, w in TILES)]
    print(
        f"proxy gradient of one weight, {args.threads} torch thread(s), process CPU time, best of "
        f"{args.repeat}; sampled in ms, the others as a multiple of sampled (< 1: faster)\n"
    )
    print("| weight | tokens | dtype | density | sampled ms | " + " | ".join(names) + " | best |")
    print("|---" * (6 + len(names)) + "|")
    for rc in args.shapes:
        for dt in args.dtypes:
            dtype = torch.bfloat16 if dt == "bf16" else torch.float32
            for n in args.tokens:
                for d in args.density:
                    t = one(rc, rc, n, dtype, d, args.repeat)
                    base = t["sampled"]
                    best = min(t, key=t.__getitem__)
                    cells = " | ".join(f"{t[k] / base:.2f}" for k in names)
                    print(
                        f"| {rc}x{rc} | {n} | {dt} | {d:g} | {base * 1e3:.1f} | {cells} | {best} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
