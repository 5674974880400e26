"""Optimizer state memory: the bytes each optimizer type allocates for the trained parameters.

One model serves ``ffid estimate`` (before training, from planned counts) and the trainer's
start-up summary (from the real proxies), so the two never disagree. The figures follow what
the real implementations allocate on their first step (tests compare them byte for byte);
nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

FP32 = 4
# bitsandbytes' 8-bit optimizers: tensors under this many elements keep fp32 states; larger ones
# keep uint8 states, one fp32 absmax per block per state and one shared 256-entry fp32 map per state.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP_BYTES = 256 * FP32

Shape = Sequence[int]


def _shape(s: int | Shape) -> tuple[int, ...]:
    """A parameter given as its element count is a 1-D tensor (the engine's proxies are)."""
    return (int(s),) if isinstance(s, int) else tuple(int(d) for d in s)


def _adafactor_second_moment(shape: tuple[int, ...]) -> int:
    """Elements of Adafactor's second moment: factored into row and column sums from 2-D on
    (torch ``row_var``/``col_var``, transformers ``exp_avg_sq_row``/``_col``), full below."""
    if len(shape) < 2:
        return math.prod(shape)
    rows = math.prod(shape[:-1])
    cols = math.prod(shape[:-2]) * shape[-1]
    return rows + cols


def _bnb_8bit(shape: tuple[int, ...], states: int) -> int:
    """Bytes of ``states`` bitsandbytes 8-bit states of one tensor, shared maps excluded."""
    n = math.prod(shape)
    if n < BNB_MIN_8BIT_SIZE:
        return states * FP32 * n
    return states * (n + FP32 * math.ceil(n / BNB_BLOCK))


@dataclass(frozen=True)
class OptimizerModel:
    """Optimizer state for fp32 parameters, as the real implementations allocate it."""

    name: str
    description: str

    def state_bytes(self, shapes: Iterable[int | Shape], options: Mapping[str, Any] | None = None) -> int:
        """Bytes of optimizer state for parameters of these shapes (an int is a 1-D count).

        ``options`` are the optimizer's hyperparameters (``optimizer.defaults``); the few that add
        a buffer count: ``momentum`` (SGD), ``amsgrad`` (AdamW), ``beta1`` (transformers Adafactor).
        """
        opts = options or {}
        sizes = [_shape(s) for s in shapes]
        numel = [math.prod(s) for s in sizes]
        if self.name == "adamw":
            # exp_avg + exp_avg_sq (+ max_exp_avg_sq with amsgrad) in fp32, plus a 0-d fp32 step
            moments = 3 if opts.get("amsgrad") else 2
            return sum(moments * FP32 * n + FP32 for n in numel)
        if self.name in ("adamw8bit", "lion8bit"):
            states = 2 if self.name == "adamw8bit" else 1
            quantised = any(n >= BNB_MIN_8BIT_SIZE for n in numel)
            return sum(_bnb_8bit(s, states) for s in sizes) + (states * BNB_QMAP_BYTES if quantised else 0)
        if self.name == "adafactor":
            # second moment (+ exp_avg with transformers' beta1), plus a 0-d fp32 step (torch) or
            # RMS (transformers)
            first = opts.get("beta1") is not None
            return sum(
                FP32 * (_adafactor_second_moment(s) + (n if first else 0)) + FP32
                for s, n in zip(sizes, numel, strict=True)
            )
        if self.name == "sgd-momentum" or (self.name == "sgd" and opts.get("momentum")):
            return sum(FP32 * n for n in numel)
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
        OptimizerModel("lion8bit", "bitsandbytes Lion8bit: ~1 B per element + block stats (fp32 under 4096)"),
    )
}

# Spellings (lowercase, without ``_``/``-``) -> model: the estimator's ``--optimizer`` names and
# the trainer's ``optimizer_type`` names. PagedAdamW8bit allocates the same states as AdamW8bit
# (in paged memory).
_ALIASES = {
    "adamw": "adamw",
    "adam": "adamw",
    "adamw8bit": "adamw8bit",
    "pagedadamw8bit": "adamw8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
    "sgdmomentum": "sgd-momentum",
    "lion8bit": "lion8bit",
}


def find_optimizer(name: str) -> OptimizerModel | None:
    """The :class:`OptimizerModel` for an optimizer name (case and ``_``/``-`` insensitive), or
    ``None`` when the model does not know it (e.g. a dotted class path)."""
    key = str(name).lower().replace("_", "").replace("-", "")
    return OPTIMIZERS[_ALIASES[key]] if key in _ALIASES else None


def check_optimizer(name: str) -> OptimizerModel:
    """The :class:`OptimizerModel` for ``--optimizer name``; unknown names raise ConfigError."""
    model = find_optimizer(name)
    if model is None:
        raise ConfigError(
            f"--optimizer {name!r} is not known to the estimator; choose one of: {', '.join(OPTIMIZERS)}"
        )
    return model


def optimizer_state_bytes(
    name: str, shapes: Iterable[int | Shape], options: Mapping[str, Any] | None = None
) -> int | None:
    """Bytes of state optimizer ``name`` allocates for parameters of these shapes (an int is a
    1-D count); ``None`` for an optimizer the model does not know. Used by ``ffid estimate`` and
    by the trainer's start-up summary alike."""
    model = find_optimizer(name)
    return None if model is None else model.state_bytes(shapes, options)
