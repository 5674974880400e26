"""What the ComfyUI checks share: ComfyUI's import path and ``--cpu``, a tiny Wan, a delta writer.

Importing this module first puts the import-time stubs (``stubs/``), ComfyUI's core
(``$FFID_COMFYUI_DIR``), ffid's ``src`` and the repository root on ``sys.path`` and sets ComfyUI's
``--cpu`` before any other ComfyUI module is imported (ComfyUI reads its arguments at import).
It is run inside the ComfyUI environment (``.venv-comfy``) by ``tests/test_comfyui.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
COMFY = Path(os.environ["FFID_COMFYUI_DIR"])
sys.path[:0] = [str(HERE / "stubs"), str(COMFY), str(REPO / "src"), str(REPO)]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args  # noqa: E402

args.cpu = True

import comfy.ops  # noqa: E402
import torch  # noqa: E402
from comfy.ldm.wan.model import WanModel  # noqa: E402

from ffid.checkpoint.delta import (  # noqa: E402
    DeltaTensor,
    TensorFingerprint,
    sample_positions,
    values_hash,
    write_delta,
)
from ffid.checkpoint.namemap import map_name  # noqa: E402

PICKED: dict[str, dict[str, torch.Tensor]] = {}  # delta file name -> tensor name -> positions


def tiny_wan_fp32(
    seed: int, dim: int = 128, ffn_dim: int = 256, num_heads: int = 1
) -> dict[str, torch.Tensor]:
    """A random Wan 2.1 DiT state dict (2 blocks, original naming) in fp32."""
    with torch.inference_mode(False):
        m = WanModel(
            dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=2, text_dim=4096, in_dim=16, out_dim=16,
            operations=comfy.ops.disable_weight_init,
        )  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in m.state_dict().items():
            scale = 0.5 if "modulation" in k else 0.05
            t = torch.randn(v.shape, generator=g) * scale
            if k.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                t = 1.0 + t
            # A few values too small for fp16's normal range, as trained bf16 weights have: they make
            # the file dtype unambiguous (bf16 values that fp16 cannot hold exactly).
            t.view(-1)[::97] *= 1e-3
            out[k] = t.contiguous()
        return out


def make_delta(
    path: Path,
    base: dict[str, torch.Tensor],
    seed: int,
    frac: float = 0.05,
    avoid: dict[str, torch.Tensor] | None = None,
    whole: tuple[str, ...] = (),
    naming: str = "wan",
    metadata: dict | None = None,
    ffid_id: int = 1,
    text: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A delta over every tensor of ``base`` (modulation included), at random positions that avoid
    ``avoid``'s; values are trained-looking fp32 (not representable in bf16/fp16)."""
    g = torch.Generator().manual_seed(seed)
    tensors, fps, picked = [], {}, {}
    for name, b in base.items():
        flat = b.reshape(-1)
        n = flat.numel()
        if name in whole:
            idx = torch.arange(n)
        else:
            free = torch.ones(n, dtype=torch.bool)
            if avoid is not None and name in avoid:
                free[avoid[name]] = False
            cand = free.nonzero().reshape(-1)
            k = max(1, int(n * frac))
            idx = cand[torch.randperm(cand.numel(), generator=g)[:k]].sort().values
        picked[name] = idx
        vals = flat[idx].to(torch.float32) + torch.randn(idx.numel(), generator=g) * 0.02
        out_name = map_name(name, "wan", naming) if naming == "diffusers" else name
        tensors.append(DeltaTensor(out_name, tuple(b.shape), idx, vals))
        fps[out_name] = TensorFingerprint(
            tuple(b.shape), values_hash(flat[idx[sample_positions(idx.numel())]])
        )
    write_delta(
        path, tensors, selector="spread", params={"ff": frac, "ffid": ffid_id, "seed": 0},
        selection_fingerprint="0" * 16, base_fingerprint=fps, base_manifest_fingerprint="0" * 16,
        naming=naming, total_params=sum(t.numel() for t in base.values()), source="train",
        metadata=metadata, text=text,
    )  # fmt: skip
    PICKED[path.name] = picked
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Bit for bit: same keys, dtypes, shapes and bytes."""
    assert got.keys() == want.keys(), what
    bad = [
        k
        for k in got
        if (got[k].dtype, got[k].shape) != (want[k].dtype, want[k].shape)
        or not torch.equal(bits(got[k]), bits(want[k]))
    ]
    assert not bad, f"{what}: {len(bad)} tensors differ, first {bad[0]}"
