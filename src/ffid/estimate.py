"""Memory needs of a run, from the model's manifest alone (a header or a preset), before training.

The figures follow what the engine really allocates (see :data:`ENGINE`), element for element:
the selection is planned exactly (the same ``plan()`` training uses), so the trainable count is
``k`` itself, not a tensor-level approximation. What cannot be known from a header (activations:
they depend on resolution, frames, batch and the attention kernel) is left out unless the user
gives it (``activations_gb``) or asks for the Wan estimate (``video_size`` + ``frames``), and the
result says so.

Parts and where they live::

    GPU   base_resident   base weights kept on the device (all of them without block swap)
          swap_in_flight  swapped blocks being used on the device (block swap only)
          proxies         fp32 trained values, k x 4 B
          indices         int32 flat positions (4 B/elem) of every partially touched tensor on
                          the compute device, plus CSR row pointers for matmul-path weights
          gradients       fp32 gradients of the proxies only, k x 4 B
          optimizer       optimizer state of the proxies (AdamW 8 B/elem, ...)
          workspace       the largest transient temporary (an upcast weight copy when the base
                          dtype is not the compute dtype, a whole tensor's dense gradient, a
                          proxy gradient) plus the effective copies of hook-path tensors kept
                          for backward
          grad_path       the proxy-gradient path's own transient, an upper bound (the dense
                          product of a weight, a block of it, or a token chunk of converted
                          operands; --grad_path, default auto: the largest the engine may pick;
                          the chunk is exact when --video_size/--frames give the tokens)
          activations     only when given or estimated
    host  swapped_blocks  weights of the swapped blocks, parked in pinned RAM
          load_peak       the whole state dict while loading (what musubi-tuner does)

Nothing here imports torch: ``ffid estimate`` on a 14B header answers in a fraction of a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dtypes import BASE_DTYPES, DTYPE_BYTES, FLOAT_DTYPES, device_index_bytes, index_code
from .errors import CapacityError, ConfigError
from .manifest import Manifest, TensorInfo
from .models import load_manifest
from .select import check_ff, plan
from .select.spread import DEFAULT_SLOTS
from .selection import Selection

GiB = 1024**3


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


@dataclass(frozen=True)
class OptimizerModel:
    """Optimizer state for 1-D fp32 proxies, as the real implementations allocate it."""

    name: str
    description: str

    def state_bytes(self, counts: Iterable[int]) -> int:
        """Bytes of optimizer state for proxies with these element counts (one proxy per tensor)."""
        counts = list(counts)
        if self.name == "adamw":
            # torch.optim.AdamW: exp_avg + exp_avg_sq in fp32, plus a 0-d fp32 ``step`` tensor.
            return sum(8 * k + 4 for k in counts)
        if self.name == "adamw8bit":
            # bitsandbytes AdamW8bit: tensors under min_8bit_size (4096) keep fp32 states; others
            # keep two uint8 states and one fp32 absmax per 256-element block per state; the two
            # 256-entry fp32 quantisation maps are shared by all parameters.
            total = 0
            any_8bit = False
            for k in counts:
                if k < 4096:
                    total += 8 * k
                else:
                    any_8bit = True
                    total += 2 * k + 2 * 4 * math.ceil(k / 256)
            return total + (2 * 256 * 4 if any_8bit else 0)
        if self.name == "adafactor":
            # Adafactor factors only matrices; 1-D proxies keep a full fp32 second moment
            # (torch.optim.Adafactor ``variance`` / transformers ``exp_avg_sq``) and a step.
            return sum(4 * k + 4 for k in counts)
        if self.name == "sgd-momentum":
            return sum(4 * k for k in counts)
        return 0  # plain SGD keeps no state


OPTIMIZERS: dict[str, OptimizerModel] = {
    o.name: o
    for o in (
        OptimizerModel("adamw", "torch AdamW: two fp32 moments, 8 B per trained element"),
        OptimizerModel(
            "adamw8bit", "bitsandbytes AdamW8bit: ~2 B per element + block stats (fp32 under 4096)"
        ),
        OptimizerModel("adafactor", "Adafactor: 1-D proxies keep a full fp32 second moment, 4 B per element"),
        OptimizerModel("sgd", "SGD without momentum: no state"),
        OptimizerModel("sgd-momentum", "SGD with momentum: one fp32 buffer, 4 B per element"),
    )
}

# ff thresholds (upper bounds) -> what such a run is typically for (after the seed's table).
USE_CASES: tuple[tuple[float, str], ...] = (
    (0.0005, "a light touch: a style nudge or one simple subject"),
    (0.005, "baseline for a simple character"),
    (0.03, "several characters and/or concepts"),
    (0.075, "deeper style transfer, complex concepts or characters"),
    (0.5, "very heavy finetuning on a specific domain"),
    (1.0, "full finetuning (no saving over training every weight)"),
)


def use_case(ff: float) -> str:
    """A one-line hint of what a run with this ``ff`` is usually for."""
    for bound, text in USE_CASES:
        if ff <= bound:
            return text
    return USE_CASES[-1][1]


@dataclass
class Estimate:
    """Memory needs of one run (one ``ff``), broken down by part. All sizes are bytes."""

    ff: float
    selector: str
    ffid: int
    slots: int | None
    trainable: int
    total_params: int
    tensors_touched: int
    tensors_total: int
    optimizer: str
    base_dtype: str
    compute_dtype: str
    blocks: int
    blocks_to_swap: int
    gpu: dict[str, int]
    host: dict[str, int]
    delta_file_bytes: int
    hint: str
    not_included: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total_params

    @property
    def gpu_total(self) -> int:
        """Everything on the compute device that this estimate includes."""
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        """Peak host RAM: the larger of loading (whole state dict) and training (swapped + copies)."""
        steady = sum(v for k, v in self.host.items() if k != "load_peak")
        return max(self.host.get("load_peak", 0), steady)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (sizes in bytes)."""
        return {
            "ff": self.ff,
            "selector": self.selector,
            "ffid": self.ffid,
            "slots": self.slots,
            "trainable": self.trainable,
            "total_params": self.total_params,
            "fraction": self.fraction,
            "tensors_touched": self.tensors_touched,
            "tensors_total": self.tensors_total,
            "optimizer": self.optimizer,
            "base_dtype": self.base_dtype,
            "compute_dtype": self.compute_dtype,
            "blocks": self.blocks,
            "blocks_to_swap": self.blocks_to_swap,
            "gpu_bytes": self.gpu_total,
            "gpu": dict(self.gpu),
            "host_bytes": self.host_total,
            "host": dict(self.host),
            "delta_file_bytes": self.delta_file_bytes,
            "use_case": self.hint,
            "not_included": list(self.not_included),
            "notes": list(self.notes),
        }


# -- pieces ---------------------------------------------------------------------------------------
def check_optimizer(name: str) -> OptimizerModel:
    """The :class:`OptimizerModel` for ``--optimizer name`` (case and ``_``/``-`` insensitive)."""
    key = str(name).lower().replace("_", "").replace("-", "")
    aliases = {
        "adamw": "adamw",
        "adam": "adamw",
        "adamw8bit": "adamw8bit",
        "adafactor": "adafactor",
        "sgd": "sgd",
        "sgdmomentum": "sgd-momentum",
    }
    if key not in aliases:
        raise ConfigError(
            f"--optimizer {name!r} is not known to the estimator; choose one of: {', '.join(OPTIMIZERS)}"
        )
    return OPTIMIZERS[aliases[key]]


def check_base_dtype(name: str | None) -> str | None:
    """Validate ``--base-dtype`` (``None``: the dtypes stored in the file)."""
    if name is None:
        return None
    key = str(name).lower()
    if key not in BASE_DTYPES:
        raise ConfigError(f"--base-dtype {name!r} is not supported; choose one of: {', '.join(BASE_DTYPES)}")
    return key


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


def stored_dtype(info: TensorInfo, base_dtype: str | None) -> str:
    """The dtype a base tensor has in memory. ``fp8`` is musubi-tuner's ``--fp8_base`` (without
    ``--fp8_scaled``, which ffid refuses): it casts the whole DiT with ``model.to(float8_e4m3fn)``,
    so every float tensor, vectors included, holds 1 byte per element."""
    if base_dtype is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype  # integer buffers keep their dtype
    return BASE_DTYPES[base_dtype]


def compute_dtype_of(manifest: Manifest, base_dtype: str | None) -> str:
    """The dtype the Linear path computes in: bf16 for fp8 bases, else the dominant base dtype."""
    if base_dtype == "fp8":
        return "BF16"
    if base_dtype is not None:
        return BASE_DTYPES[base_dtype]
    by_dtype: dict[str, int] = {}
    for t in manifest:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel
    dominant = max(by_dtype, key=by_dtype.__getitem__)
    return "BF16" if dominant.startswith("F8") else dominant


def index_dtype_bytes(numel: int) -> int:
    """Bytes per index a delta file stores for a tensor of ``numel`` elements (ffid.dtypes.index_code)."""
    return DTYPE_BYTES[index_code(numel)]


def delta_file_bytes(selection: Selection) -> int:
    """Size of the delta file of ``selection`` as ``ffid.checkpoint`` writes it: fp32 values, for
    partly trained tensors also indices in the smallest integer type that fits the tensor (whole
    tensors store none), and the safetensors JSON header with the base fingerprint metadata."""
    entries: list[tuple[str, str, list[int], int]] = []
    for name, pick in selection.items():
        if pick.whole:
            entries.append((name + ".ffid_value", "F32", list(pick.shape), 4 * pick.count))
        else:
            code = index_code(pick.numel)
            entries.append((name + ".ffid_index", code, [pick.count], DTYPE_BYTES[code] * pick.count))
            entries.append((name + ".ffid_value", "F32", [pick.count], 4 * pick.count))
    data = sum(e[3] for e in entries)
    header = 2
    for key, code, shape, _ in entries:
        # offsets have about as many digits as the running total; use the final total (an upper bound)
        dims = ",".join(map(str, shape))
        header += len(f'"{key}":{{"dtype":"{code}","shape":[{dims}],"data_offsets":[{data},{data}]}},')
    # metadata: a per-tensor base fingerprint [[shape], 16 hex] stored as an escaped JSON string,
    # plus about 700 bytes of fixed keys (format, fingerprints, ss_* / modelspec.* keys, params)
    for name, pick in selection.items():
        header += len(name) + len(",".join(map(str, pick.shape))) + 34
    header += 700 + 20 * len(selection.params)
    header += -header % 8
    return 8 + header + data


def swapped_blocks(manifest: Manifest, blocks_to_swap: int) -> tuple[int, set[str]]:
    """``(number of blocks, names of the tensors in the last blocks_to_swap blocks)``.

    Block swap parks the *last* N blocks of the largest block group (musubi-tuner's convention).
    """
    groups: dict[str, set[int]] = {}
    for b in manifest.blocks():
        groups.setdefault(b.group, set()).add(b.index)
    if not groups:
        if blocks_to_swap:
            raise ConfigError(
                f"--blocks_to_swap {blocks_to_swap}: the model has no repeated blocks to swap; use 0 "
                "(or --block-pattern to say where its blocks are)"
            )
        return 0, set()
    group = max(groups, key=lambda g: len(groups[g]))
    indices = sorted(groups[group])
    n = len(indices)
    if not 0 <= blocks_to_swap < n:
        raise ConfigError(
            f"--blocks_to_swap {blocks_to_swap} is out of range for a model with {n} blocks; use 0..{n - 1} "
            "(at least one block must stay on the GPU)"
        )
    parked = set(indices[n - blocks_to_swap :]) if blocks_to_swap else set()
    names = set()
    for t in manifest:
        b = manifest.block_of(t.name)
        if b is not None and b.group == group and b.index in parked:
            names.add(t.name)
    return n, names


# -- activations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WanShape:
    """The numbers of a Wan DiT that fix its activation sizes."""

    dim: int
    ffn: int
    layers: int
    patch: tuple[int, int, int]
    in_channels: int


def wan_shape(manifest: Manifest) -> WanShape | None:
    """Read dim/ffn/layers/patch of a Wan DiT from its manifest (original or diffusers naming)."""
    if "patch_embedding.weight" not in manifest:
        return None
    pe = manifest["patch_embedding.weight"].shape
    if len(pe) != 5:
        return None
    ffn_names = ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight")
    ffn = next((manifest[n].shape[0] for n in ffn_names if n in manifest), None)
    if ffn is None:
        return None
    layers = len({b.index for b in manifest.blocks() if b.group == "blocks"})
    return WanShape(pe[0], ffn, layers, (pe[2], pe[3], pe[4]), pe[1])


# Per token and per block, elements kept by one Wan block's forward for its backward, in units of
# dim and ffn (self- and cross-attention inputs/outputs, q/k/v before and after norm and rope,
# the FFN input and its two hidden tensors), for an SDPA/flash kernel that keeps no L x L matrix.
WAN_BLOCK_DIM_FACTOR = 20
WAN_BLOCK_FFN_FACTOR = 2


def wan_tokens(shape: WanShape, height: int, width: int, frames: int) -> int:
    """Tokens of one video in the DiT: latent frames x latent rows x latent columns over the patch."""
    # Wan 2.1 VAE: 4x temporal, 8x spatial (16 latent channels); Wan 2.2 VAE: 4x16x16 (48 channels).
    stride = 16 if shape.in_channels == 48 else 8
    latent_frames = (frames - 1) // 4 + 1
    pt, ph, pw = shape.patch
    return math.ceil(latent_frames / pt) * math.ceil(height / stride / ph) * math.ceil(width / stride / pw)


def wan_activation_bytes(
    shape: WanShape, height: int, width: int, frames: int, batch: int = 1, compute_bytes: int = 2
) -> int:
    """Activations of a Wan training step with gradient checkpointing (a rough estimate).

    Checkpointing keeps only each block's input (fp32 residual stream, 4 B) and rebuilds one block
    at a time in backward, whose saved tensors are about ``20 x dim + 2 x ffn`` elements per token.
    """
    tokens = wan_tokens(shape, height, width, frames) * batch
    kept = shape.layers * tokens * shape.dim * 4
    one_block = tokens * (WAN_BLOCK_DIM_FACTOR * shape.dim + WAN_BLOCK_FFN_FACTOR * shape.ffn) * compute_bytes
    return kept + one_block


GRAD_PATHS = ("auto", "sampled", "dense", "chunked")


def _tokens_per_call(
    manifest: Manifest, video_size: Sequence[int] | None, frames: int | None, batch_size: int
) -> int | None:
    """Tokens per matmul call of a Wan estimate (``--video_size`` + ``--frames``), else None."""
    if video_size is None or frames is None or len(video_size) != 2:
        return None
    try:
        shape = wan_shape(manifest)
        if shape is None:
            return None
        tokens = wan_tokens(shape, int(video_size[0]), int(video_size[1]), int(frames))
        return tokens * max(1, int(batch_size))
    except (ConfigError, ValueError, TypeError):
        return None


# -- the estimate ---------------------------------------------------------------------------------
def estimate_selection(
    selection: Selection,
    *,
    optimizer: str = "adamw",
    base_dtype: str | None = None,
    blocks_to_swap: int = 0,
    activations_gb: float | None = None,
    video_size: Sequence[int] | None = None,
    frames: int | None = None,
    batch_size: int = 1,
    engine: EngineLayout = ENGINE,
    grad_path: str = "auto",
) -> Estimate:
    """Memory needs of training ``selection`` (see the module docstring for the parts).

    ``grad_path`` is the engine's proxy-gradient path (``auto``, ``sampled``, ``dense``,
    ``chunked``; see ``ffid.engine.paths``): its transient counts in the workspace.
    """
    if grad_path not in GRAD_PATHS:
        raise ConfigError(f"--grad_path {grad_path!r} is not one of {', '.join(GRAD_PATHS)}")
    opt = check_optimizer(optimizer)
    base_dtype = check_base_dtype(base_dtype)
    manifest = selection.manifest
    compute = compute_dtype_of(manifest, base_dtype)
    cbytes = DTYPE_BYTES[compute]
    nblocks, parked = swapped_blocks(manifest, int(blocks_to_swap))

    counts = [p.count for p in selection.values()]
    k = sum(counts)

    def nbytes(t: TensorInfo) -> int:
        return t.numel * DTYPE_BYTES[stored_dtype(t, base_dtype)]

    resident = sum(nbytes(t) for t in manifest if t.name not in parked)
    parked_bytes = sum(nbytes(t) for t in manifest if t.name in parked)
    in_flight = 0
    if parked:
        per_block: dict[int, int] = {}
        for t in manifest:
            if t.name in parked:
                b = manifest.block_of(t.name)
                assert b is not None
                per_block[b.index] = per_block.get(b.index, 0) + nbytes(t)
        # One swapped block is computing while the next one is copied in.
        in_flight = 2 * max(per_block.values()) if len(per_block) > 1 else max(per_block.values())

    # Indices on the compute device, and the transient temps of each path (see EngineLayout /
    # the engine): matmul path: the effective weight is the base with the proxies swapped in
    # place when the base is in the compute dtype, else an upcast copy; the proxy gradient is k
    # fp32 values, a whole-tensor pick's a dense fp32 matrix (and its effective weight the proxy,
    # cast to the compute dtype). Hook path: an effective copy (fp32 for fp8 bases) that the
    # module may keep for backward, and its dense gradient in backward.
    device_indices = 0
    largest_temp = 0
    kept_copies = 0
    tokens = _tokens_per_call(manifest, video_size, frames, batch_size)
    path_temp = 0  # the proxy-gradient path's own transient (an upper bound; see grad_transient)
    for name, pick in selection.items():
        info = manifest[name]
        matmul, hook = engine_routes(manifest, info)
        wide = device_index_bytes(info.numel) // 4  # int64 instead of int32 from 2**31 elements on
        if not pick.whole:
            device_indices += pick.count * engine.device_index_bytes * wide
        if matmul and not pick.whole:
            device_indices += (info.shape[0] + 1) * engine.crow_index_bytes * wide
        if matmul:
            if pick.whole:
                temp = info.numel * max(4, cbytes)
            else:
                upcast = stored_dtype(info, base_dtype) != compute
                temp = max(info.numel * cbytes if upcast else 0, pick.count * 4)
                rows = info.shape[0]
                path_temp = max(path_temp, engine.grad_transient(grad_path, rows, info.numel // rows, tokens))
            largest_temp = max(largest_temp, temp)
        if hook:
            hb = (
                4
                if stored_dtype(info, base_dtype).startswith("F8")
                else DTYPE_BYTES[stored_dtype(info, base_dtype)]
            )
            kept_copies += info.numel * hb
            largest_temp = max(largest_temp, info.numel * hb)
    if base_dtype == "fp8":
        # every fp8 Linear, trained or not, is upcast to the compute dtype for its matmul
        largest_temp = max(
            largest_temp,
            max((t.numel for t in manifest if stored_dtype(t, base_dtype) == "F8_E4M3"), default=0) * cbytes,
        )
    workspace = largest_temp + kept_copies

    gpu = {
        "base_resident": resident,
        "swap_in_flight": in_flight,
        "proxies": k * engine.proxy_bytes,
        "indices": device_indices,
        "gradients": k * engine.grad_bytes,
        "optimizer": opt.state_bytes(counts),
        "workspace": workspace,
        "grad_path": path_temp,
    }
    not_included: list[str] = []
    notes: list[str] = []
    if activations_gb is not None:
        if not math.isfinite(activations_gb) or activations_gb < 0:
            raise ConfigError(f"--activations-gb {activations_gb!r} must be a non-negative number of GiB")
        gpu["activations"] = int(activations_gb * GiB)
        notes.append(f"activations: {activations_gb:g} GiB as given")
    elif video_size is not None or frames is not None:
        gpu["activations"] = _wan_activations(manifest, video_size, frames, batch_size, cbytes, notes)
    else:
        not_included.append(
            "activations (depend on resolution, frames, batch and attention kernel: pass --activations-gb, "
            "or --video_size H W --frames F for a Wan estimate)"
        )
    not_included.append("CUDA context and allocator fragmentation (typically 0.3-1 GiB)")

    host = {
        "swapped_blocks": parked_bytes,
        "load_peak": sum(t.nbytes for t in manifest),
    }
    notes.append(
        "host peak assumes the whole state dict is in RAM once while loading (musubi-tuner does this)"
    )
    if parked and opt.name == "adamw8bit":
        notes.append(
            "adamw8bit with block swap: proxies and their state stay on the GPU, so bitsandbytes works"
        )

    slots = selection.params.get("slots")
    return Estimate(
        ff=float(selection.params.get("ff", selection.fraction)),
        selector=selection.selector,
        ffid=int(selection.params.get("ffid", 0)),
        slots=int(slots) if slots is not None else None,
        trainable=k,
        total_params=selection.total_params,
        tensors_touched=len(selection),
        tensors_total=len(manifest),
        optimizer=opt.name,
        base_dtype=base_dtype or "as stored",
        compute_dtype=compute,
        blocks=nblocks,
        blocks_to_swap=int(blocks_to_swap),
        gpu=gpu,
        host=host,
        delta_file_bytes=delta_file_bytes(selection),
        hint=use_case(float(selection.params.get("ff", selection.fraction))),
        not_included=not_included,
        notes=notes,
    )


def _wan_activations(
    manifest: Manifest,
    video_size: Sequence[int] | None,
    frames: int | None,
    batch: int,
    cbytes: int,
    notes: list[str],
) -> int:
    if video_size is None or frames is None:
        raise ConfigError("the Wan activation estimate needs both --video_size H W and --frames F")
    if len(video_size) != 2 or any(int(v) < 1 for v in video_size):
        raise ConfigError(
            f"--video_size {list(video_size)} must be two positive numbers, height and width (e.g. 480 832)"
        )
    if int(frames) < 1 or (int(frames) - 1) % 4:
        raise ConfigError(f"--frames {frames} must be 4n+1 (1, 5, ..., 81) as the Wan VAE needs")
    if int(batch) < 1:
        raise ConfigError(f"--batch_size {batch} must be a positive integer")
    shape = wan_shape(manifest)
    if shape is None:
        raise ConfigError(
            "--video_size/--frames estimate activations of Wan DiTs only and this model is not one; "
            "pass --activations-gb instead"
        )
    h, w = (int(v) for v in video_size)
    tokens = wan_tokens(shape, h, w, int(frames))
    notes.append(
        f"activations: rough Wan estimate for {h}x{w}, {frames} frames, batch {batch} "
        f"({tokens:,} tokens/video) "
        "with gradient checkpointing and a flash/SDPA kernel; not checked against measurement"
    )
    return wan_activation_bytes(shape, h, w, int(frames), int(batch), cbytes)


def _plan_for_estimate(
    manifest: Manifest,
    ff: float,
    ffid: int,
    selector: str,
    slots: int | None,
    notes: list[str],
    **plan_kwargs: Any,
) -> Selection:
    if selector != "spread":
        if slots is not None:
            plan_kwargs["slots"] = slots  # plan() rejects selector options with a clear message
        return plan(manifest, ff, ffid, selector, **plan_kwargs)
    if slots is not None:
        return plan(manifest, ff, ffid, selector, slots=slots, **plan_kwargs)
    # Without --slots, a fraction above what one id of the default layout holds is estimated in
    # the largest layout that fits it (memory does not depend on the layout), and said so.
    try:
        return plan(manifest, ff, ffid, selector, **plan_kwargs)
    except CapacityError:
        for fitting in range(min(DEFAULT_SLOTS - 1, int(1 / ff)), ffid, -1):
            try:
                sel = plan(manifest, ff, ffid, selector, slots=fitting, **plan_kwargs)
            except CapacityError:
                continue
            notes.append(
                f"--ff {ff:g} does not fit the default {DEFAULT_SLOTS}-slot layout; estimated with "
                f"--slots {fitting} (ids 0..{fitting - 1}): train with the same --slots"
            )
            return sel
        raise


def estimate(
    model: Any,
    ffs: float | Sequence[float],
    *,
    ffid: int = 0,
    selector: str = "spread",
    slots: int | None = None,
    seed: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    block_pattern: str | None = None,
    optimizer: str = "adamw",
    base_dtype: str | None = None,
    blocks_to_swap: int = 0,
    activations_gb: float | None = None,
    video_size: Sequence[int] | None = None,
    frames: int | None = None,
    batch_size: int = 1,
    grad_path: str = "auto",
) -> list[Estimate]:
    """Estimate memory for each ``ff`` of ``ffs`` on ``model`` (module, path, preset or manifest).

    The selection is planned exactly as training would plan it; only names, shapes and dtypes are
    read. Bad values raise :class:`~ffid.errors.ConfigError` with one line saying how to fix them.
    """
    single = isinstance(ffs, (int, float, str))
    values = [ffs] if single else list(ffs)  # type: ignore[list-item]
    if not values:
        raise ConfigError("give at least one --ff value, e.g. --ff 0.001 0.01")
    fracs = [check_ff(v) for v in values]
    check_optimizer(optimizer)
    check_base_dtype(base_dtype)
    manifest = load_manifest(model, block_pattern)
    out = []
    for ff in fracs:
        notes: list[str] = []
        extra: dict[str, Any] = {"seed": seed} if seed is not None else {}
        sel = _plan_for_estimate(
            manifest, ff, ffid, selector, slots, notes, include=include, exclude=exclude, **extra
        )
        est = estimate_selection(
            sel,
            optimizer=optimizer,
            base_dtype=base_dtype,
            blocks_to_swap=blocks_to_swap,
            activations_gb=activations_gb,
            video_size=video_size,
            frames=frames,
            batch_size=batch_size,
            grad_path=grad_path,
        )
        est.notes[:0] = notes
        out.append(est)
    return out


# -- text output ----------------------------------------------------------------------------------
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
    "activations": "activations",
}
HOST_LABELS = {"swapped_blocks": "swapped blocks", "load_peak": "load peak"}


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
    brows = [["ff", *(GPU_LABELS[k] for k in gpu_keys), "|", *(HOST_LABELS[k] for k in HOST_LABELS)]]
    for e in estimates:
        brows.append(
            [
                f"{e.ff:g}",
                *(human_bytes(e.gpu.get(k, 0)) for k in gpu_keys),
                "|",
                *(human_bytes(e.host[k]) for k in HOST_LABELS),
            ]
        )
    lines += [
        "",
        "GPU parts | host parts:",
        *_table(brows, set(range(1, len(brows[0]))) - {len(gpu_keys) + 1}),
    ]
    notes = list(dict.fromkeys(n for e in estimates for n in e.notes))
    missing = list(dict.fromkeys(n for e in estimates for n in e.not_included))
    if missing:
        lines += ["", "Not included: " + "; ".join(missing) + "."]
    for n in notes:
        lines.append(f"Note: {n}.")
    return "\n".join(lines)


__all__ = [
    "ENGINE",
    "ENGINE_NOTE",
    "OPTIMIZERS",
    "EngineLayout",
    "Estimate",
    "OptimizerModel",
    "delta_file_bytes",
    "estimate",
    "estimate_selection",
    "format_estimates",
    "use_case",
    "wan_activation_bytes",
]
