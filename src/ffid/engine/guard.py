"""The optimizer guard: the optimizer holds exactly the proxies, NaN/inf steps are handled, and
bf16 proxies are stepped in fp32 and rounded back stochastically."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import TrainingError


class HandleChecks:
    """The NaN/inf checks of :class:`~ffid.engine.handle.FfidHandle` (a mixin: they read its proxies)."""

    on_nonfinite: str
    proxies: Any
    parameters: Any

    def nonfinite(self, grads: bool = True) -> list[str]:
        """Names of the tensors whose proxy gradients (or values, ``grads=False``) hold NaN/inf."""
        tensors = []
        names = []
        for n, p in self.proxies():
            t = p.grad if grads else p.detach()
            if t is not None:
                tensors.append(torch.isfinite(t).all())
                names.append(n)
        if not tensors:
            return []
        ok = torch.stack([t.to("cpu") for t in tensors])  # one sync per device, not per tensor
        if bool(ok.all()):
            return []
        return [n for n, good in zip(names, ok.tolist(), strict=False) if not good]

    def check_finite(self, on_nonfinite: str | None = None) -> bool:
        """Check the proxy gradients before an optimizer step.

        ``"raise"`` (default from :func:`attach`): :class:`TrainingError` naming the tensors.
        ``"skip"`` / ``"warn"``: drop every proxy gradient (so the optimizer step does nothing),
        warn (``"warn"``) and return False. Returns True when all gradients are finite.
        """
        mode = on_nonfinite or self.on_nonfinite
        bad = self.nonfinite()
        if not bad:
            return True
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        if mode == "raise":
            raise TrainingError(
                f"NaN/inf gradient in {listed}; lower the learning rate, use bf16 instead of fp16, or "
                "attach with on_nonfinite='skip' to skip such steps"
            )
        for p in self.parameters():
            p.grad = None
        if mode == "warn":
            warnings.warn(f"ffid: NaN/inf gradient in {listed}; step skipped", RuntimeWarning, stacklevel=2)
        return False

    def _require_finite(self, what: str) -> None:
        bad = self.nonfinite(grads=False)
        if bad:
            raise TrainingError(
                f"refusing {what}: trained values of {', '.join(bad[:5])} hold NaN/inf; "
                "resume from an earlier "
                "checkpoint with a lower learning rate"
            )


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bf16 stochastically: unbiased, so updates below bf16 precision still
    accumulate in expectation."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the 16 low bits: truncation after adding noise
    out = rounded.view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


def check_optimizer(handle: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`TrainingError` if ``optimizer`` holds model weights or misses proxies."""
    mine = {id(p) for p in handle.parameters()}
    model_params = {id(p): n for n, p in handle.model.named_parameters(remove_duplicate=False)}
    given = [p for g in optimizer.param_groups for p in g["params"]]
    foreign = [model_params[id(p)] for p in given if id(p) in model_params]
    if foreign:
        raise TrainingError(
            f"the optimizer was given {len(foreign)} base weight(s) of the model "
            f"(first: {foreign[0]!r}); "
            "they are frozen and never trained: build it on handle.parameters()"
        )
    missing = len(mine - {id(p) for p in given})
    if missing:
        raise TrainingError(
            f"the optimizer misses {missing} of the {len(mine)} ffid proxies; build it on handle.parameters()"
        )


def guard(handle: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Check ``optimizer`` and hook it: NaN/inf gradients are handled per ``on_nonfinite`` before
    every step, and bf16 proxies are stepped in fp32 and stochastically rounded back."""
    handle.check_optimizer(optimizer)

    def pre(opt: Any, args: Any, kwargs: Any) -> None:
        handle.check_finite()
        if handle.proxy_dtype == torch.bfloat16:
            for p in handle.parameters():
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()

    def post(opt: Any, args: Any, kwargs: Any) -> None:
        if handle.proxy_dtype == torch.bfloat16:
            for p in handle.parameters():
                p.data = stochastic_round_bf16(p.data)
                if p.grad is not None:
                    p.grad = p.grad.to(torch.bfloat16)

    handle._sr_hooks.append(optimizer.register_step_pre_hook(pre))
    handle._sr_hooks.append(optimizer.register_step_post_hook(post))
    return optimizer
