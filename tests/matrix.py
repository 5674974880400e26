"""The one test matrix: tiny models x selectors x gradient routes x gradient paths.

Every test that runs one check over "every kind of model" takes its cases from here, so a new
model, selector option, matmul route or gradient path is added in one place and the shared
invariants (tests/test_matrix.py) cover it at once. The models themselves are built by
tests/tiny_models.py; this module only says which ones the matrix holds and how each is fed.

- :data:`MODELS`: the tiny models, each with a deterministic batch and the matmul routes its
  weights take (checked by ``test_matrix_covers_every_route``).
- :data:`SELECTORS`: ``spread`` with its defaults, ``spread`` with non-default options, and
  ``compat-v2`` (whole tensors).
- :data:`ROUTES`: one-layer nets, one per matmul route of the engine (Linear, transformers'
  Conv1D, Wan's patch conv), large enough in tokens for the gradient paths to walk chunks.
- :data:`GRAD_PATHS`: the exact gradient paths of ``ffid.engine.paths`` (``FFID_GRAD_PATH``).

Pytest parameters: :data:`CASES` (model x selector) and :func:`path_cases` (model x selector x
gradient path, the path only where a selection has partial tensors: whole tensors ignore it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from ffid import plan
from ffid.engine import paths
from ffid.names import canonical_name
from ffid.selection import Selection
from tiny_models import TinyMLPConv, lm_inputs, tiny_gpt2, tiny_llama, tiny_mlp, tiny_wan, tiny_wan_inputs

Batch = dict[str, torch.Tensor]

# The device the device-aware matrix tests run on: ``cpu`` unless ``FFID_TEST_DEVICE`` names
# another (``cuda``), so the same invariants can be checked on a GPU (bench/gpu/run.sh) while CPU
# CI stays as it is.
DEVICE = torch.device(os.environ.get("FFID_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    # cuDNN convolutions default to TF32, which would make full finetuning's reference gradient
    # of the patch conv differ from the engine's fp32 one by far more than rounding.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def to_device(batch: Batch) -> Batch:
    """``batch`` on :data:`DEVICE`."""
    return {k: v.to(DEVICE) for k, v in batch.items()}


# -- models ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyModel:
    """One model of the matrix: how to build it (same weights every call) and feed it."""

    build: Callable[[], nn.Module]
    batch: Callable[[int], Batch]  # batch(seed): a deterministic input batch
    routes: frozenset[str]  # matmul routes its selected weights take under spread (see ROUTES)


def _mlp_batch(seed: int = 1) -> Batch:
    return {"x": TinyMLPConv.example_input(seed=seed)}


def _wan_batch(seed: int = 1) -> Batch:
    return tiny_wan_inputs(seed=seed)


def _lm_batch(seed: int = 1) -> Batch:
    return lm_inputs(seed=seed)


MODELS: dict[str, TinyModel] = {
    "mlp": TinyModel(tiny_mlp, _mlp_batch, frozenset({"linear"})),  # its 3x3 padded conv is generic
    "wan": TinyModel(tiny_wan, _wan_batch, frozenset({"linear", "patch-conv"})),
    "gpt2": TinyModel(tiny_gpt2, _lm_batch, frozenset({"linear", "conv1d"})),
    "llama": TinyModel(tiny_llama, _lm_batch, frozenset({"linear"})),
}


def loss_of(model: nn.Module, batch: Batch) -> torch.Tensor:
    """A scalar loss for any matrix model: the LM loss where the model gives one, else mean square."""
    if "x" in batch:
        return model(batch["x"]).pow(2).mean()
    out = model(**batch)
    if getattr(out, "loss", None) is not None:
        return out.loss
    return out.sample.pow(2).mean()


# -- selectors ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectorCase:
    """A selector with the ``ff``, ``ffid`` and options the matrix runs it at."""

    selector: str
    ff: float
    ffid: int
    options: dict[str, Any] = field(default_factory=dict)

    def plan(self, model: Any, ffid: int | None = None) -> Selection:
        """This case's selection of ``model`` (another id of the same layout with ``ffid``)."""
        return plan(model, self.ff, self.ffid if ffid is None else ffid, self.selector, **self.options)

    @property
    def partial(self) -> bool:
        """Whether the selection takes elements out of tensors (so the gradient path matters)."""
        return self.selector != "compat-v2"


SELECTORS: dict[str, SelectorCase] = {
    "spread": SelectorCase("spread", 0.04, 3),
    "spread-slots4-seed7": SelectorCase("spread", 0.04, 2, {"slots": 4, "seed": 7}),
    "compat-v2": SelectorCase("compat-v2", 0.05, 2),  # whole tensors
}


# -- matmul routes -----------------------------------------------------------------------------------
TOKENS = 300  # rows of every route net's input: several chunks once the paths' bounds are lowered


class RouteNet(nn.Module):
    """One layer as a model, so that its weight is named ``layer.weight``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _linear() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return RouteNet(nn.Linear(48, 40)), torch.randn(3, TOKENS // 3, 48)


def _conv1d() -> tuple[nn.Module, torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(40, 48)  # weight [48, 40]: y = x @ W + b
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return RouteNet(layer), torch.randn(2, TOKENS // 2, 48)


def _patch_conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Conv3d(4, 24, kernel_size=(1, 2, 2), stride=(1, 2, 2))  # Wan's patch embedding
    return RouteNet(layer), torch.randn(1, 4, 3, 20, 20)  # 3 x 10 x 10 = 300 patches


ROUTES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "linear": _linear,
    "conv1d": _conv1d,
    "patch-conv": _patch_conv,
}
GRAD_PATHS: tuple[str, ...] = paths.PATHS


# -- pytest parameters -------------------------------------------------------------------------------
def model_cases(models: Iterable[str] = MODELS, selectors: Iterable[str] = SELECTORS) -> list[Any]:
    """``(model_key, sel_key)`` parameters with readable ids (``gpt2-compat-v2``)."""
    selectors = list(selectors)
    return [pytest.param(m, s, id=f"{m}-{s}") for m in models for s in selectors]


def path_cases() -> list[Any]:
    """``(model_key, sel_key, grad_path)``: every path for partial selections, one run (path None,
    the default) for whole-tensor ones."""
    out = []
    for m in MODELS:
        for s, case in SELECTORS.items():
            for p in GRAD_PATHS if case.partial else (None,):
                out.append(pytest.param(m, s, p, id=f"{m}-{s}" + (f"-{p}" if p else "")))
    return out


CASES = model_cases()


# -- building a case ---------------------------------------------------------------------------------
def make(model_key: str, sel_key: str) -> tuple[nn.Module, Selection, Callable[[int], Batch]]:
    """A fresh model in eval mode (no dropout, so runs compare), its selection and its batches."""
    spec = MODELS[model_key]
    model = spec.build().eval()
    return model, SELECTORS[sel_key].plan(model), spec.batch


def masks(model: nn.Module, sel: Selection) -> dict[str, torch.Tensor]:
    """For every parameter name of ``model``, a boolean mask of its selected elements."""
    out = {}
    for name, p in model.named_parameters():
        m = torch.zeros(p.numel(), dtype=torch.bool)
        cname = canonical_name(name)
        if cname in sel:
            m[sel.indices(cname)] = True
        out[name] = m.view(p.shape)
    return out


def snapshot(model: nn.Module) -> Batch:
    """A detached copy of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
