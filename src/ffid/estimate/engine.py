"""What ``ffid.engine`` allocates for the touched tensors: index tensors, the workspace of
transient copies, and the proxy-gradient path's own transient (without importing the engine,
which needs torch; ``tests/test_engine_paths.py`` checks the constants mirror ``engine/paths``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..dtypes import DTYPE_BYTES, device_index_bytes
from ..manifest import Manifest, TensorInfo
from ..selection import Selection, TensorPick
from .base import FP8_SCALED, fp8_scaled_target, stored_dtype

GRAD_PATHS = ("auto", "sampled", "dense", "chunked")


@dataclass(frozen=True)
class EngineLayout:
    """Bytes ``ffid.engine`` allocates per trained element (kept in one place so that
    ``bench/estimate_check.py`` compares the estimate with the engine's real tensors).

    Per touched tensor the engine keeps an fp32 proxy and, unless the whole tensor is picked,
    its flat positions on the compute device as int32 (int64 from 2**31 elements on); a weight
    on the matmul path (Linear, Conv1D, patch conv) also caches ``rows + 1`` CSR row pointers
    there. Nothing is kept on the host (indices are regenerated from the selection, O(k), when
    needed). On the matmul path, a base weight already in the compute dtype has the proxies
    swapped in place around each matmul: no weight-sized copy.
    """

    proxy_bytes: int = 4
    grad_bytes: int = 4
    device_index_bytes: int = 4  # per selected element; doubled from 2**31 elements on
    crow_index_bytes: int = 4  # per CSR row pointer; doubled from 2**31 elements on
    # Proxy-gradient paths (ffid.engine.paths, same constants): the dense product of a weight is
    # one fp32 [R, C] transient, run per block of rows (at most dense_block_bytes) when larger
    # than dense_grad_max_bytes; the sampled path converts tokens in chunks of at most
    # sampled_chunk_bytes (on a GPU).
    dense_grad_max_bytes: int = 256 * 2**20
    dense_block_bytes: int = 64 * 2**20
    sampled_chunk_bytes: int = 64 * 2**20

    def grad_transient(self, path: str, rows: int, cols: int, tokens: int | None) -> int:
        """Bytes the proxy gradient of one ``[rows, cols]`` matmul weight allocates at once on
        ``path`` (``auto``: the largest the engine may choose); ``tokens`` per call if known."""
        dense = rows * cols * 4
        block = min(rows, max(1, self.dense_block_bytes // (4 * cols))) * cols * 4
        step = max(64, self.sampled_chunk_bytes // (4 * (rows + cols)))
        sampled = (step if tokens is None else min(tokens, step)) * (rows + cols) * 4
        if path == "sampled":
            return sampled
        if path == "dense":
            return dense
        if path == "chunked":
            return block
        return max(sampled, dense if dense <= self.dense_grad_max_bytes else block)


ENGINE_NOTE = "indices and workspace follow ffid.engine: int32 indices, in-place swap (estimate_check)"


ENGINE = EngineLayout()


# Last name components of weights that are looked up, not multiplied (they take the hook path).
_EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "embed_positions",
        "tok_embeddings",
        "shared",
        "embedding",
    }
)
_OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")


def engine_routes(manifest: Manifest, info: TensorInfo) -> tuple[bool, bool]:
    """``(matmul, hook)``: whether a touched tensor takes the engine's sparse-gradient matmul path
    and/or its generic hook path, inferred from the name and shape (a header has no module types).

    Matrices named ``*.weight`` are Linear/Conv1D weights; convolution weights (3-D and more) are
    on the matmul path only for patch embeddings (stride = kernel). Embedding tables take the hook
    path, and also the matmul path when no separate output head exists (tied LM heads).
    """
    parts = info.name.split(".")
    if len(parts) < 2 or parts[-1] != "weight" or len(info.shape) < 2:
        return False, True
    module = parts[-2]
    if module in _EMBEDDING_NAMES:
        tied = not any(h in manifest for h in _OUTPUT_HEADS) and not any(
            n.endswith("." + h) for n in manifest.names for h in _OUTPUT_HEADS
        )
        return tied, True
    if len(info.shape) > 2:
        return "patch" in info.name, "patch" not in info.name
    return True, False


@dataclass(frozen=True)
class Touched:
    """One touched tensor as the engine handles it: its base info, its pick, its paths."""

    info: TensorInfo
    pick: TensorPick
    matmul: bool
    hook: bool

    @property
    def index_width(self) -> int:
        """1, or 2 where flat positions need int64 (from 2**31 elements on)."""
        return device_index_bytes(self.info.numel) // 4  # int64 instead of int32 from 2**31 elements on


def touched_tensors(selection: Selection) -> list[Touched]:
    """Every touched tensor of ``selection`` with the engine paths it takes."""
    manifest = selection.manifest
    out = []
    for name, pick in selection.items():
        info = manifest[name]
        out.append(Touched(info, pick, *engine_routes(manifest, info)))
    return out


def index_bytes(touched: Sequence[Touched], engine: EngineLayout = ENGINE) -> int:
    """Index tensors on the compute device: flat positions of every partly touched tensor, plus
    CSR row pointers of partly touched matmul-path weights (whole-tensor picks need none)."""
    total = 0
    for t in touched:
        if t.pick.whole:
            continue
        total += t.pick.count * engine.device_index_bytes * t.index_width
        if t.matmul:
            total += (t.info.shape[0] + 1) * engine.crow_index_bytes * t.index_width
    return total


def workspace_bytes(
    touched: Sequence[Touched],
    manifest: Manifest,
    base_dtype: str | None,
    compute: str,
    engine: EngineLayout = ENGINE,
) -> int:
    """The largest transient temporary plus the effective copies hook-path modules keep for backward.

    Matmul path: the effective weight is the base with the proxies swapped in place when the base
    is in the compute dtype, else an upcast copy; the proxy gradient is k fp32 values, a
    whole-tensor pick's a dense fp32 matrix (and its effective weight the proxy, cast to the
    compute dtype). Hook path: an effective copy (fp32 for fp8 bases) that the module may keep
    for backward, and its dense gradient in backward.
    """
    cbytes = DTYPE_BYTES[compute]
    largest = 0
    kept_copies = 0
    for t in touched:
        stored = stored_dtype(t.info, base_dtype)
        if t.matmul:
            if t.pick.whole:
                temp = t.info.numel * max(4, cbytes)
            else:
                upcast = t.info.numel * cbytes if stored != compute else 0
                temp = max(upcast, t.pick.count * engine.grad_bytes)
            largest = max(largest, temp)
        if t.hook:
            copy = t.info.numel * (4 if stored.startswith("F8") else DTYPE_BYTES[stored])
            kept_copies += copy
            largest = max(largest, copy)
    if base_dtype == "fp8":
        # every fp8 Linear, trained or not, is upcast to the compute dtype for its matmul
        fp8 = (t.numel for t in manifest if stored_dtype(t, base_dtype) == "F8_E4M3")
        largest = max(largest, max(fp8, default=0) * cbytes)
    if base_dtype == FP8_SCALED:
        # musubi's patched forward of an untrained scaled Linear: weight.to(bf16), then that copy
        # times the scale, two weight-sized bf16 tensors at once (ffid's own path makes one)
        fp8 = (t.numel for t in manifest if fp8_scaled_target(t))
        largest = max(largest, 2 * max(fp8, default=0) * cbytes)
    return largest + kept_copies


def dequant_kept_bytes(
    touched: Sequence[Touched], manifest: Manifest, base_dtype: str | None, compute: str
) -> int:
    """fp8-scaled only: the dequantized weights of one block that autograd keeps for backward.

    musubi's patched forward of an untrained scaled Linear passes the dequantized bf16 weight to
    ``F.linear``, which saves it to compute the input's gradient; with gradient checkpointing one
    block is rebuilt at a time, so the untrained quantized weights of the largest block are held
    at once. Weights ffid trains take its own path, which saves no weight (it recomputes it).
    """
    if base_dtype != FP8_SCALED:
        return 0
    trained = {t.info.name for t in touched if t.matmul}
    per_block: dict[object, int] = {}
    for t in manifest:
        if fp8_scaled_target(t) and t.name not in trained:
            b = manifest.block_of(t.name)
            per_block[b] = per_block.get(b, 0) + t.numel * DTYPE_BYTES[compute]
    return max(per_block.values(), default=0)


def grad_path_bytes(
    touched: Sequence[Touched], grad_path: str, tokens: int | None, engine: EngineLayout = ENGINE
) -> int:
    """The proxy-gradient path's own transient: the largest over partly touched matmul weights
    (an upper bound; see :meth:`EngineLayout.grad_transient`)."""
    largest = 0
    for t in touched:
        if t.matmul and not t.pick.whole:
            rows = t.info.shape[0]
            largest = max(largest, engine.grad_transient(grad_path, rows, t.info.numel // rows, tokens))
    return largest
