"""``attach()`` and :class:`FfidHandle`: train exactly the selected elements of a model.

What attaching does to the model (and ``detach()`` undoes):

1. Every parameter of the model gets ``requires_grad=False`` (the old flags are restored on
   detach). Base weights never get a ``.grad`` and are never left modified during training (the
   matmul path swaps the selected entries in for one matmul and writes the base values back).
2. One fp32 ``nn.Parameter`` (a *proxy*) per touched tensor holds the selected values; the proxies
   are the only parameters of the handle, so ``handle.parameters()`` is what the optimizer gets.
3. *Every read* of a touched tensor through its module attribute (``module.weight``,
   ``block.modulation``, ...), from any code path (the module's own forward, a checkpointed inner
   function, a helper calling ``F.linear(x, self.q.weight)``, a compiled region), returns the
   effective tensor ``base.index_put(idx, proxy)``, differentiable w.r.t. the proxy. It is done
   the way ``torch.nn.utils.parametrize`` does it: the module's class is swapped for a subclass
   of the same name that has a property per touched attribute (one subclass per original class,
   shared by every instance of that class in the model, so ``a.__class__ == b.__class__`` checks
   of block-swap code still hold). ``module._parameters[attr]`` stays the untouched base
   Parameter, so ``state_dict``, ``named_parameters``, ``.to()`` and block swap keep working; the
   returned tensor is an :class:`EffectiveTensor` whose ``.data`` reads and writes the *base*
   Parameter's data (musubi's swap does ``module.weight.data = ...``).
4. On top of that, the ``forward`` of ``nn.Linear``, transformers ``Conv1D`` and convs whose
   stride equals their kernel (Wan's patch embedding) with a touched weight is replaced by an
   instance attribute calling :class:`~ffid.engine.kernels.SelectedMatmul` (the *matmul path*),
   which never saves the effective weight and computes only the selected entries of the weight
   gradient. Other reads of those weights still get the effective tensor (step 3).

Both read the base Parameter at call time, so block swap / offload that swaps ``.data`` under
the same Parameter objects keeps working; index tensors are cached per compute device (int32,
4 B per selected element, int64 for tensors of 2**31 elements or more; none kept on the host).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ..checkpoint.delta_format import sample_positions
from ..errors import ConfigError, MismatchError, TrainingError
from ..names import canonical_name
from ..select import SelectionSettings
from ..selection import Selection
from . import guard as _guard
from . import paths, routes
from .guard import HandleChecks
from .kernels import FP8_DTYPES
from .reads import READS_KEY, EffectiveTensor, original_class, read_class
from .reporting import HandleReport
from .scaled import scale_at, write_at
from .slots import Slot, resolve, scatter_

# Modules currently patched by a live handle (owner module -> handle), to refuse double attaches.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()

FINGERPRINT_KEY = "ffid_fingerprint"
ON_NONFINITE = ("raise", "skip", "warn")


class FfidHandle(HandleChecks, HandleReport, nn.Module):
    """The trainable side of an attached model: one fp32 proxy per touched tensor.

    Made by :func:`attach`; see that function for what is changed on the model. The handle is an
    ``nn.Module`` whose only parameters are the proxies (so DDP / accelerate can wrap it) and
    whose only buffer is the selection fingerprint; calling it calls the model.
    """

    def __init__(
        self,
        model: nn.Module,
        selection: Selection,
        *,
        device: torch.device | str | None = None,
        proxy_dtype: torch.dtype = torch.float32,
        on_nonfinite: str = "raise",
        freeze: bool = True,
        grad_path: str | None = None,
    ):
        super().__init__()
        self.grad_path = paths.check_path(grad_path)
        if on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"on_nonfinite={on_nonfinite!r} is not one of {', '.join(ON_NONFINITE)}")
        if proxy_dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(
                f"proxy_dtype={proxy_dtype} is not supported; use torch.float32 (default) or torch.bfloat16 "
                "(stochastic rounding through handle.guard(optimizer))"
            )
        object.__setattr__(self, "_model", model)
        self.selection = selection
        self.on_nonfinite = on_nonfinite
        self.proxy_dtype = proxy_dtype
        self._slots: dict[str, Slot] = {}
        self._aliases: dict[str, Slot] = {}  # every canonical name of a touched Parameter (tied ones too)
        self._patched_forwards: list[
            tuple[nn.Module, Any]
        ] = []  # (module, previous instance forward or None)
        self._read_modules: list[nn.Module] = []  # modules whose class was given read properties
        # When True, every read and every matmul-path forward uses the base tensors (proxies
        # ignored): the one switch a "teacher" (base model) forward needs.
        self._base_reads = False
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._base_snapshot: dict[str, torch.Tensor] | None = None  # set by merge()
        self._base_known: dict[str, torch.Tensor] = {}  # set_base_values(): the file's values
        # the base values a delta's fingerprint hashes, read once here: saving then never reads
        # the module's weights, which musubi's block swap may be exchanging in another thread
        self._attach_sample: dict[str, torch.Tensor] = {}
        # use_proxies(): another proxy set (and its base) for the same selection, e.g. the other
        # expert of a Wan 2.2 two-expert run; None: the handle's own parameters
        self._active_set: Mapping[str, nn.Parameter] | None = None
        self._active_base: dict[str, torch.Tensor] | None = None
        self._attached = False
        self._sr_hooks: list[Any] = []

        # validates everything before touching the model
        slots, self._aliases = resolve(model, selection, self.grad_path, _ATTACHED)
        fp = bytes.fromhex(selection.fingerprint)
        self.register_buffer(FINGERPRINT_KEY, torch.tensor(list(fp), dtype=torch.uint8))
        for slot in slots:
            base = slot.param.detach()
            dev = torch.device(device) if device is not None else base.device
            if slot.whole and slot.scaled is None:
                values = base.reshape(-1).to(torch.float32, copy=True)
            else:  # the values the model computes with: fp8 x scale for a scaled weight
                values = slot.values(base)
            self.register_parameter(slot.key, nn.Parameter(values.to(device=dev, dtype=proxy_dtype)))
            self._attach_sample[slot.name] = _fingerprint_sample(values)
            self._slots[slot.name] = slot
        self._install(model, freeze)

    # -- construction ------------------------------------------------------------------------

    def _install(self, model: nn.Module, freeze: bool) -> None:
        if freeze:
            for p in model.parameters():
                self._requires_grad.append((p, p.requires_grad))
                p.requires_grad_(False)
        # Modules whose weight takes the matmul path: their bias (if touched) is handled inside.
        patched: dict[int, tuple[nn.Module, str, Slot]] = {}
        for slot in self._slots.values():
            for o in slot.owners:
                route = routes.matmul_route(o.module, o.attr)
                if route != "generic":
                    o.route = route
                    patched[id(o.module)] = (o.module, route, slot)
        bias_of: dict[int, Slot] = {}
        for slot in self._slots.values():
            for o in slot.owners:
                if o.route == "generic" and id(o.module) in patched and o.attr == "bias":
                    o.route = "in-forward"
                    bias_of[id(o.module)] = slot

        for mid, (module, route, slot) in patched.items():
            previous = module.__dict__.get("forward")
            self._patched_forwards.append((module, previous))
            module.forward = partial(routes.FORWARDS[route], self, module, slot, bias_of.get(mid))
        self._install_reads(model)
        self._attached = True

    def _install_reads(self, model: nn.Module) -> None:
        """Make every attribute read of a touched tensor return the effective tensor (all routes).

        Each owner module gets ``{attr: (handle, slot)}`` in its ``__dict__`` and its class swapped
        for the read class of its original class; every other instance of those classes in the
        model gets the same read class (its properties then return the plain Parameter), so that
        code comparing classes of blocks (musubi's block swap asserts it) sees one class.
        """
        attrs_of: dict[type, set[str]] = {}
        for slot in self._slots.values():
            for o in slot.owners:
                reads = o.module.__dict__.setdefault(READS_KEY, {})
                reads[o.attr] = (self, slot)
                attrs_of.setdefault(original_class(type(o.module)), set()).add(o.attr)
                _ATTACHED[o.module] = self
        for module in model.modules():
            cls = original_class(type(module))
            if cls in attrs_of:
                sub = read_class(type(module), attrs_of[cls])
                if type(module) is not sub:
                    module.__class__ = sub
                self._read_modules.append(module)

    # -- forward paths -----------------------------------------------------------------------
    def _proxy(self, slot: Slot) -> torch.Tensor:
        active = self._active_set
        if active is not None:
            return active[slot.key]
        return self._parameters[slot.key]  # type: ignore[return-value]

    def _effective(self, slot: Slot, base: torch.Tensor) -> torch.Tensor:
        """Differentiable full tensor: ``base`` with the selected positions = proxy (generic path)."""
        proxy = self._proxy(slot)
        dtype = torch.float32 if base.dtype in FP8_DTYPES else base.dtype
        if slot.scaled is not None:
            # the stored (fp8-domain) tensor: whoever reads it multiplies by the scale, as
            # musubi's forward does, and gets the trained value at the selected positions
            idx = slot.idx_on(base.device)
            scale = scale_at(slot.scale(), idx, base.shape[-1])
            flat = base.detach().reshape(-1).to(dtype)
            return flat.index_put((idx,), proxy.to(device=base.device, dtype=dtype) / scale).view(base.shape)
        if slot.whole:
            return proxy.to(device=base.device, dtype=dtype).view(base.shape)
        flat = base.detach().reshape(-1).to(dtype)
        values = proxy.to(device=base.device, dtype=dtype)
        return flat.index_put((slot.idx_on(base.device),), values).view(base.shape)

    def _read(self, slot: Slot, base: torch.Tensor) -> torch.Tensor:
        """What ``module.<attr>`` returns for a touched tensor: the effective tensor (or the base
        while ``_base_reads`` is set)."""
        if self._base_reads:
            return base
        eff = self._effective(slot, base).as_subclass(EffectiveTensor)
        eff._ffid_base = base
        return eff

    def _bias(self, module: nn.Module, bias_slot: Slot | None) -> torch.Tensor | None:
        b = module._parameters.get("bias")
        if b is None or bias_slot is None or self._base_reads:
            return b
        return self._effective(bias_slot, b)

    def _pattern(self, slot: Slot, rows: int, cols: int) -> Any:
        return slot.pattern.matrix(rows, cols)

    @contextlib.contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """The model as it was before this run, for as long as the ``with`` block lasts.

        Inside the block every forward uses the base weights only: this run's slice is back at
        its starting values, so the model equals a separately built base + earlier deltas, bit
        for bit (ids are disjoint, so nothing else differs). No weight is copied or written:
        the base is never modified while training and the proxies are not touched, so the
        trained values are in effect again, unchanged, when the block ends. Gradients are off
        inside (a teacher is a fixed target); nesting is allowed.

        Raises :class:`~ffid.errors.TrainingError` after :meth:`merge` (the base then holds the
        trained values) or :meth:`detach`.
        """
        if not self._attached:
            raise TrainingError("handle.teacher() needs an attached handle; this one was detached")
        if self._base_snapshot is not None:
            raise TrainingError(
                "handle.teacher() after handle.merge(): the base weights now hold the trained values, "
                "so the model as it was before this run is gone; use the teacher before merging"
            )
        before = self._base_reads
        self._base_reads = True  # every read of a touched tensor, and every forward, sees the base
        try:
            with torch.no_grad():
                yield self.model
        finally:
            self._base_reads = before

    @property
    def in_teacher(self) -> bool:
        """True inside :meth:`teacher`."""
        return self._base_reads

    # -- the contract --------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The model this handle is attached to (not a submodule of the handle)."""
        return self._model  # type: ignore[no-any-return]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model (so that ``DDP(handle)(batch)`` runs the model's forward)."""
        return self.model(*args, **kwargs)

    def proxies(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(canonical name, proxy)`` pairs in selection order."""
        for name, slot in self._slots.items():
            yield name, self._proxy(slot)  # type: ignore[misc]

    def trained_values(self) -> dict[str, torch.Tensor]:
        """Canonical name -> fp32 CPU tensor of the current values at ``selection.indices(name)``."""
        return {n: p.detach().to(device="cpu", dtype=torch.float32, copy=True) for n, p in self.proxies()}

    def base_values(self) -> dict[str, torch.Tensor]:
        """Canonical name -> the base values at the selected positions (fp32 CPU) as when attached."""
        if self._base_snapshot is not None:
            return {n: t.clone() for n, t in self._base_snapshot.items()}
        if self._active_base is not None:
            return {n: t.clone() for n, t in self._active_base.items()}
        known = self._base_known
        return {
            name: known[name].clone() if name in known else slot.values(slot.param.detach())
            for name, slot in self._slots.items()
        }

    def base_sample(self) -> dict[str, torch.Tensor]:
        """Canonical name -> the base values a delta's base fingerprint hashes (the entries at
        ``checkpoint.sample_positions`` of :meth:`base_values`, fp32 CPU), without reading the
        model: taken when attached, or from :meth:`set_base_values` / :meth:`use_proxies`."""
        whole = self._base_snapshot if self._base_snapshot is not None else self._active_base
        if whole is not None:
            return {n: _fingerprint_sample(t) for n, t in whole.items()}
        known = self._base_known
        return {
            n: _fingerprint_sample(known[n]) if n in known else t.clone()
            for n, t in self._attach_sample.items()
        }

    def set_base_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Take ``values`` (at the selected positions) as this run's base and starting values.

        For a model that holds its weights less precisely than the checkpoint file they came
        from (musubi's ``--fp8_scaled`` keeps an fp8 copy of a bf16 file): the proxies start
        from the file's values, and deltas are fingerprinted against them, so a delta is exact
        against the file users merge into. Tensors not named keep the model's values. Call it
        before training (it overwrites the proxies of the named tensors).
        """
        if self._base_snapshot is not None:
            raise TrainingError(
                "handle.set_base_values() after handle.merge(): the base was already replaced"
            )
        self.load_values(values)  # checks names and sizes, all or nothing
        for n, v in values.items():
            # kept by reference when already fp32 on the CPU (one host copy at 14B is ~0.5 GiB):
            # the caller must not change it afterwards
            self._base_known[n] = v.reshape(-1).to(device="cpu", dtype=torch.float32)

    def use_proxies(
        self, params: Mapping[str, nn.Parameter] | None, base: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Train and read another proxy set of the same selection from now on (``None``: the
        handle's own).

        ``params`` maps each proxy key (``handle.proxy_keys()``) to a Parameter shaped like the
        handle's; ``base`` holds that set's base values (what :meth:`base_values` returns while it
        is active). Forwards, ``proxies()``, saving and loading then use it. Two-expert runs (Wan
        2.2: one set per expert, same positions) switch with it when the model's weights switch.
        """
        if params is None:
            self._active_set, self._active_base = None, None
            return
        for name, slot in self._slots.items():
            p = params.get(slot.key)
            own = self._parameters[slot.key]
            if p is None or own is None or p.shape != own.shape:
                raise MismatchError(f"the proxy set given to use_proxies() has no fitting proxy for {name!r}")
        if base is None or set(base) != set(self._slots):
            raise MismatchError("use_proxies() needs the base values of every trained tensor of the set")
        self._active_set = dict(params)
        self._active_base = {
            n: v.reshape(-1).to(device="cpu", dtype=torch.float32, copy=True) for n, v in base.items()
        }

    def proxy_keys(self) -> dict[str, str]:
        """Canonical name -> the key of its proxy (``.`` is not allowed in parameter names)."""
        return {name: slot.key for name, slot in self._slots.items()}

    def effective_state(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(canonical key, CPU tensor)`` for every model state-dict entry, trained values applied.

        One tensor at a time (for streaming full saves). Floating tensors are cast to ``dtype``
        when given. Untouched tensors may be views of the live model: do not modify them.
        """
        for key, t in self.model.state_dict().items():
            name = canonical_name(key)
            slot = self._aliases.get(name)
            target = dtype if dtype is not None and t.is_floating_point() else t.dtype
            if slot is None:
                yield name, t.detach().to(device="cpu", dtype=target)
                continue
            if slot.scaled is not None:
                raise ConfigError(
                    f"{name} is a scaled fp8 weight (musubi's --fp8_scaled): a whole-model save would write "
                    "fp8 values without their scales; save the delta and `ffid merge` it into the bf16 file"
                )
            out = t.detach().to(device="cpu", dtype=target, copy=True)
            values = self._proxy(slot).detach().cpu()
            scatter_(out.view(-1), slot.idx_on(out.device, cache=False), values)
            yield name, out

    def load_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set the proxies from values at the selected positions (e.g. a delta file), all or nothing."""
        unknown = [n for n in values if n not in self._slots]
        if unknown:
            raise MismatchError(
                f"values for {len(unknown)} tensor(s) this selection does not train (first: {unknown[0]!r}); "
                f"they belong to another selection than {self.selection.fingerprint}"
            )
        for n, v in values.items():
            if v.numel() != self._slots[n].count:
                raise MismatchError(
                    f"{n!r}: {v.numel()} values given but the selection trains {self._slots[n].count} "
                    "elements of it; the values belong to another selection"
                )
        with torch.no_grad():
            for n, v in values.items():
                p = self._proxy(self._slots[n])
                p.copy_(v.reshape(-1).to(device=p.device, dtype=p.dtype))  # type: ignore[union-attr]

    def save_delta(self, path: Any, **kw: Any) -> Any:
        """Write the trained values as a delta file (see :func:`ffid.checkpoint.save_delta`)."""
        from ..checkpoint import save_delta

        self._require_finite("saving")
        return save_delta(self, path, **kw)

    def save_full(self, path: Any, dtype: torch.dtype | None = None, **kw: Any) -> Any:
        """Write the whole model with trained values applied (see :func:`ffid.checkpoint.save_full`)."""
        from ..checkpoint import save_full

        self._require_finite("saving")
        return save_full(self, path, dtype=dtype, **kw)

    def merge(self) -> None:
        """Write the trained values into the base weights (in their dtype); the model then *is* the
        finetuned model, also after :meth:`detach`. Refuses NaN/inf values."""
        self._require_finite("merging")
        if self._base_snapshot is None:
            self._base_snapshot = self.base_values()
        with torch.no_grad():
            for slot in self._slots.values():
                base = slot.param.data
                idx = slot.idx_on(base.device, cache=False)
                # a scaled weight takes them in the fp8 domain, with its own scale
                write_at(
                    base, slot.scale() if slot.scaled is not None else None, idx, self._proxy(slot).detach()
                )

    def detach(self) -> None:
        """Undo :func:`attach`: forwards restored, ``requires_grad`` flags restored.

        Base weights were never left modified (unless :meth:`merge` was called), so the model is bit for
        bit what it was, with the same Parameter objects. The proxies stay readable.
        """
        if not self._attached:
            return
        for module, previous in self._patched_forwards:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._patched_forwards.clear()
        for slot in self._slots.values():
            for o in slot.owners:
                reads = o.module.__dict__.get(READS_KEY)
                if reads is not None and reads.get(o.attr, (None,))[0] is self:
                    del reads[o.attr]
                if _ATTACHED.get(o.module) is self:
                    del _ATTACHED[o.module]
            slot.pattern.drop_cache()
        for module in self._read_modules:
            if module.__dict__.get(READS_KEY):
                continue  # another live handle still reads through this module
            module.__dict__.pop(READS_KEY, None)
            module.__class__ = original_class(type(module))
        self._read_modules.clear()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._requires_grad.clear()
        for h in self._sr_hooks:
            h.remove()
        self._sr_hooks.clear()
        self._attached = False

    def index_tensors(self) -> list[torch.Tensor]:
        """Every index tensor the engine keeps (per-device flat positions and CSR row pointers),
        for memory accounting; empty after :meth:`detach`."""
        return [t for slot in self._slots.values() for t in slot.pattern.tensors()]

    @property
    def attached(self) -> bool:
        return self._attached

    # -- state -------------------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[no-untyped-def]
        # Refuse before anything is copied: a state of another selection would put values at
        # the wrong positions silently.
        key = prefix + FINGERPRINT_KEY
        got = state_dict.get(key)
        if got is None:
            raise MismatchError(
                "the state has no ffid selection fingerprint; it was not saved by handle.state_dict()"
            )
        got_hex = bytes(got.to(torch.uint8).tolist()).hex()
        if got_hex != self.selection.fingerprint:
            raise MismatchError(
                f"the state was saved for selection {got_hex} but this handle trains "
                f"{self.selection.fingerprint}; "
                "attach with the same model, selector, --ff and --ffid as the saved run"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise :class:`TrainingError` if ``optimizer`` holds model weights or misses proxies."""
        _guard.check_optimizer(self, optimizer)

    def guard(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Check ``optimizer`` and hook it: NaN/inf gradients are handled per ``on_nonfinite`` before
        every step, and bf16 proxies are stepped in fp32 and stochastically rounded back."""
        return _guard.guard(self, optimizer)

    def extra_repr(self) -> str:
        sel = self.selection
        n = len(self._slots)
        return f"{sel.selector} {sel.describe_params()}, {n} proxies, attached={self._attached}"


def attach(
    model: nn.Module,
    selection: Selection | SelectionSettings | None = None,
    *,
    ff: float | None = None,
    ffid: int | None = None,
    selector: str | None = None,
    device: torch.device | str | None = None,
    proxy_dtype: torch.dtype = torch.float32,
    on_nonfinite: str = "raise",
    freeze: bool = True,
    grad_path: str | None = None,
    **plan_kwargs: Any,
) -> FfidHandle:
    """Attach ffid to ``model``: train exactly the elements of ``selection``.

    ``selection`` is a :class:`~ffid.selection.Selection`, or the
    :class:`~ffid.select.SelectionSettings` to plan one on ``model``; without it,
    ``ff``/``ffid``/``selector``/``plan_kwargs`` (``include=``, ``slots=``, ...) make the settings.

    What it changes on the model (all undone by ``handle.detach()``; ``handle.describe()`` prints it):

    - ``requires_grad=False`` on every parameter (``freeze=False`` leaves the flags alone);
    - the ``forward`` of each ``nn.Linear`` / ``Conv1D`` / patch conv with a touched weight is
      replaced by an instance attribute (sparse-gradient path);
    - every module owning a touched tensor (and every other instance of its class in the model)
      gets a same-named subclass whose properties make ``module.<name>`` return the effective
      tensor (base with the selected positions = proxies, differentiable) from any code path;
      ``module._parameters`` keeps the base Parameters.

    Base weights are never left modified during training. The returned :class:`FfidHandle` holds one
    proxy per touched tensor (``proxy_dtype``, fp32 by default, on ``device`` or the weight's
    device); give ``handle.parameters()`` to the optimizer, ideally through ``handle.guard(opt)``
    which checks it and handles NaN/inf gradients per ``on_nonfinite`` (``raise``/``skip``/``warn``).

    ``grad_path`` forces how the selected weight gradients are computed (``"sampled"``,
    ``"dense"``, ``"chunked"``; default: ``FFID_GRAD_PATH`` or ``"auto"``, a fixed rule from the
    weight's shape, dtype and device type; see :mod:`ffid.engine.paths`).

    Raises :class:`~ffid.errors.AttachError` when the model is already attached and
    :class:`~ffid.errors.MismatchError` when the selection was planned for another model; the
    model is untouched in both cases.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"attach() needs an nn.Module, got {type(model).__name__}")
    if selection is None:
        if ff is None or ffid is None:
            raise ConfigError(
                "attach() needs a selection, or ff= and ffid= to plan one (e.g. ff=0.01, ffid=1)"
            )
        selection = SelectionSettings.create(ff, ffid, selector, **plan_kwargs)
    elif ff is not None or ffid is not None or selector is not None or plan_kwargs:
        raise ConfigError("give attach() either a selection or ff=/ffid=/selector options, not both")
    if isinstance(selection, SelectionSettings):
        selection = selection.plan(model)
    return FfidHandle(
        model,
        selection,
        device=device,
        proxy_dtype=proxy_dtype,
        on_nonfinite=on_nonfinite,
        freeze=freeze,
        grad_path=grad_path,
    )


def _fingerprint_sample(values: torch.Tensor) -> torch.Tensor:
    """The entries of a tensor's selected values that its base fingerprint hashes (fp32 CPU)."""
    flat = values.reshape(-1)
    return flat[sample_positions(flat.numel()).to(flat.device)].to(device="cpu", dtype=torch.float32)
