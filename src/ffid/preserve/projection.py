"""Protection by projection: keep earlier characters by construction, not by a loss weight.

A Linear layer ``y = W x`` changes its answer to an input ``x`` only through ``dW x``. Collect the
inputs ``x`` the layer sees while the model draws the *protected prompts* (the same set the loss
method protects: earlier deltas' prompts, the user's, the regularisation prompts, the empty one),
take an orthonormal basis ``Q`` of their span, and keep every trained row's change orthogonal to
it, ``dW <- dW (I - Q Q^T)``: then ``dW x = 0`` for every protected input, and no weight trades the
new character against the old ones.

- **Text side (exact).** Layers that read only the text conditioning (Wan's cross-attention K/V,
  the text embedder) see the same inputs whatever the latent and time. Their basis keeps every
  direction of those inputs, so their outputs for the protected prompts stay what they were, up
  to float rounding.
- **Image side (sampled).** Every other layer reads image tokens. Its protected inputs come from
  the model's own drawings of each protected prompt, re-noised at random times (pure-noise latents
  are off the path sampling takes, and protected the wrong inputs in the prototype). Its basis
  keeps the leading directions holding ``energy`` of those inputs' energy.
- The change *since the run started* is projected after every optimizer step (Adam's per-element
  scaling moves an update out of the allowed subspace, so projecting the gradient alone is not
  enough); the gradient is projected too, so that Adam's moments are not spent on directions the
  projection removes.
- Only whole rows can be projected (a sparse change of a row becomes dense), so the method trains
  the ``rows`` selector's selections. ``--ffid`` still gives disjoint rows, so deltas of different
  ids still merge in any order; protection itself now comes from the subspaces.

Cost: one feature pass before training (no extra forward per step) and two small products per
trained tensor per step. Bases are computed in float64 on the CPU from inputs drawn with the
run's seed, eigenvalue ties broken by index, so a resumed run rebuilds the same bases.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..errors import ConfigError
from ..estimate.projection import TOKEN_BUDGET
from ..names import canonical_name
from ..presets.wan import TEXT_SIDE_PATTERN
from ..select import ROW_SELECTOR, get_selector
from .prompts import Protected, describe_protected

if TYPE_CHECKING:
    from torch import nn

METHODS = ("loss", "projection")
# Layers whose input is the text conditioning alone are protected exactly (the one definition,
# shared with the estimate, is beside the Wan shapes). A task may set ``projection_exact``.
EXACT_PATTERN = TEXT_SIDE_PATTERN
# Directions whose energy is below this share of the largest are numerical noise, not inputs.
RANK_TOL = 1e-12
DEFAULT_ENERGY = 0.99
DEFAULT_TOKENS = TOKEN_BUDGET  # image-side token rows per protected input in a Gram (why: there)


BASES_PLACES = ("device", "cpu")


@dataclass(frozen=True)
class ProjectionSettings:
    """How the protected inputs are drawn and how much of their span the bases keep."""

    energy: float = DEFAULT_ENERGY  # share of the sampled inputs' energy the image-side bases hold
    draws: int = 4  # the model's own drawings per protected prompt
    times: int = 2  # random re-noising times per drawing
    sample_steps: int = 10  # sampler steps of a drawing (tasks that draw)
    # image-side token rows per protected input folded into a Gram (0: all); see DEFAULT_TOKENS
    tokens: int = DEFAULT_TOKENS
    project_grad: bool = True  # also project the gradient before the optimizer sees it
    # where the bases live: "device" (with the trained values) or "cpu" (host memory, each moved
    # to the values' device for each product that uses it: the GPU holds one basis at a time, at
    # the cost of moving them at every projection, twice a step; the same bits either way)
    bases: str = "device"

    def validate(self) -> ProjectionSettings:
        e = self.energy
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not (math.isfinite(e) and 0 < e <= 1):
            raise ConfigError(
                f"preserve_energy = {e!r} is outside (0, 1]; give the share of the protected inputs' energy "
                f"to keep, e.g. {DEFAULT_ENERGY}"
            )
        for name in ("draws", "times", "sample_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"preserve_{name} = {getattr(self, name)} must be at least 1")
        t = self.tokens
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ConfigError(
                f"preserve_tokens = {t!r} is not a whole number >= 0; give the image-side tokens per "
                f"protected input to sample, e.g. {DEFAULT_TOKENS}, or 0 for all"
            )
        if self.bases not in BASES_PLACES:
            raise ConfigError(
                f"preserve_bases = {self.bases!r} is not one of {', '.join(BASES_PLACES)}; use cpu to keep "
                "the bases in host memory (the GPU then holds one at a time)"
            )
        return self


@runtime_checkable
class ProjectionSource(Protocol):
    """What a task provides to feed the feature pass with its own drawings (optional).

    Without it a :class:`~ffid.preserve.Preservable` task's pure-noise ``preservation_batch`` is
    used, ``draws * times`` times: weaker on the image side (see the module docstring).
    """

    def projection_batches(
        self,
        model: nn.Module,
        prompts: Sequence[str],
        generator: torch.Generator,
        settings: ProjectionSettings,
    ) -> Iterable[dict[str, Any]]:
        """Batches of protected inputs: each prompt drawn ``settings.draws`` times by ``model``,
        each drawing re-noised at ``settings.times`` random times; randomness from ``generator``."""
        ...

    def preservation_outputs(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Run the model on a batch (the feature pass only needs the forward)."""
        ...


@dataclass
class _Group:
    """Layers that read the very same input tensor share one basis (Wan's q/k/v; every block's
    cross-attention K/V read the same text features)."""

    width: int
    exact: bool
    gram: torch.Tensor | None = None  # float64 CPU, width x width, while collecting
    # float32 on the proxies' device: Q (width x rank), or its complement (width x (width - rank))
    # when that is narrower, so a basis never holds more than width / 2 columns
    basis: torch.Tensor | None = None
    complement: bool = False
    rank: int = 0
    members: list[str] = field(default_factory=list)


@dataclass
class _Trained:
    """One trained tensor under projection: its proxy, start values and basis."""

    name: str
    proxy: torch.nn.Parameter
    start: torch.Tensor  # [rows, width] fp32 on the proxy's device
    group: _Group

    @property
    def rows(self) -> int:
        return self.start.shape[0]


@dataclass(frozen=True)
class ProjectionStats:
    """What the feature pass found, for the run's summary and report."""

    groups: int
    exact_groups: int
    trained: int  # tensors under projection
    trained_rows: int
    rows_without_room: int  # rows whose every direction is protected (they cannot move)
    basis_bytes: int
    inputs: int  # protected input batches run
    ranks: dict[str, tuple[int, int]]  # first member of each group -> (rank, width)


def _module_of(model: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """Canonical weight name -> the module owning it as ``weight`` (for the names asked)."""
    out: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if module._parameters.get("weight") is not None:
            name = canonical_name(f"{path}.weight" if path else "weight")
            if name in names and name not in out:
                out[name] = module
    return out


def basis_from_gram(
    gram: torch.Tensor, energy: float, exact: bool, *, complement: bool = False
) -> torch.Tensor:
    """Orthonormal columns spanning ``gram``'s leading directions (float64); with ``complement``,
    the other directions instead (the free ones).

    Exact groups keep every direction above :data:`RANK_TOL`; sampled groups the fewest leading
    directions holding ``energy`` of the trace. Eigenvalue ties are broken by index (stable sort),
    so the basis is a function of the Gram matrix alone.
    """
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp(min=0)
    order = torch.sort(-values, stable=True).indices
    values, vectors = values[order], vectors[:, order]
    top = float(values[0]) if values.numel() else 0.0
    rank = int((values > top * RANK_TOL).sum()) if top > 0 else 0
    if rank and not exact and energy < 1:
        share = torch.cumsum(values, 0) / values.sum()
        rank = min(rank, int((share < energy).sum()) + 1)
    return vectors[:, rank:] if complement else vectors[:, :rank]


class Projector:
    """Keeps this run's change off the protected prompts' inputs; usable from any training loop.

    ``handle`` is the attached :class:`~ffid.engine.FfidHandle` (a ``rows`` selection), ``task``
    runs the model (:class:`ProjectionSource` or a ``Preservable``), ``protected`` the prompts::

        projector = Projector(handle, task, protected_prompts([delta1]), ProjectionSettings())
        projector.collect(model, torch.Generator().manual_seed(seed))   # the feature pass
        projector.install(optimizer)                                    # project at every step
    """

    def __init__(
        self,
        handle: Any,
        task: Any,
        protected: Sequence[Protected],
        settings: ProjectionSettings | None = None,
        *,
        exact_pattern: str | None = None,
    ):
        if not protected:
            raise ConfigError(
                "preserve_method = 'projection' but there is no protected prompt: train on top of "
                "base_deltas that record prompts, give preserve_prompts = ['...'], keep preserve_empty "
                "on, or set preserve = 'off'"
            )
        if not callable(getattr(task, "preservation_outputs", None)):
            raise ConfigError(
                f"task {getattr(task, 'name', type(task).__name__)!r} cannot run protected inputs (it "
                "lacks preservation_outputs); set preserve = 'off'"
            )
        self.handle = handle
        self.task = task
        self.protected = list(protected)
        self.settings = (settings or ProjectionSettings()).validate()
        pattern = exact_pattern or getattr(task, "projection_exact", None) or EXACT_PATTERN
        self._exact = re.compile(pattern)
        self._trained: list[_Trained] = []
        self._groups: list[_Group] = []
        self._hooks: list[Any] = []
        self.stats: ProjectionStats | None = None
        self._check_rows()

    # -- what is trained ----------------------------------------------------------------------
    def _check_rows(self) -> None:
        """Every trained tensor must be whole rows of a Linear weight: refuse anything else now."""
        sel = self.handle.selection
        if not get_selector(sel.selector).whole_rows:
            raise ConfigError(
                f"preserve_method = 'projection' trains whole rows of Linear weights, but the {sel.selector} "
                f"selector takes scattered elements; use selector = {ROW_SELECTOR!r}"
            )
        modules = _module_of(self.handle.model, set(sel))
        for name, pick in sel.items():
            module = modules.get(name)
            if module is None or len(pick.shape) != 2 or not isinstance(module, torch.nn.Linear):
                raise ConfigError(
                    f"preserve_method = 'projection' can only protect rows of Linear weights, and "
                    f"{name!r} is not one; exclude it (exclude = [...])"
                )
            # a selection named after a row selector can still come from a file (explicit indices)
            idx = pick.indices()
            cols = pick.shape[1]
            rows = idx[::cols] // cols if idx.numel() else idx
            whole = idx.numel() % cols == 0 and torch.equal(
                idx, (rows[:, None] * cols + torch.arange(cols)).reshape(-1)
            )
            if not whole:
                raise ConfigError(
                    f"preserve_method = 'projection' trains whole rows, but the {sel.selector} selection "
                    f"takes scattered elements of {name!r}; use selector = {ROW_SELECTOR!r}"
                )

    # -- the feature pass -----------------------------------------------------------------------
    def _batches(self, model: nn.Module, generator: torch.Generator) -> Iterable[dict[str, Any]]:
        prompts = [p.prompt for p in self.protected]
        if callable(getattr(self.task, "projection_batches", None)):
            return self.task.projection_batches(model, prompts, generator, self.settings)
        make = getattr(self.task, "preservation_batch", None)
        if not callable(make):
            raise ConfigError(
                f"task {getattr(self.task, 'name', '?')!r} gives no protected inputs (neither "
                "projection_batches nor preservation_batch); set preserve = 'off'"
            )
        n = self.settings.draws * self.settings.times
        return [make(prompts, generator) for _ in range(n)]

    def collect(
        self,
        model: nn.Module,
        generator: torch.Generator,
        *,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> ProjectionStats:
        """The feature pass: run the protected inputs through the model as it was before this run
        (the handle's teacher), gather each trained layer's inputs, and build the bases."""
        sel = self.handle.selection
        modules = _module_of(model, set(sel))
        # The start values are read now, before any forward: under block swap the last forwards
        # leave weight moves running in the offloader's thread (musubi waits for them only when
        # it switches back to training), and a read of the base weights then could catch a block
        # in the middle of its exchange.
        starts = self.handle.base_values()
        # The inputs of the current forward, held so that no address is reused while it runs:
        # layers that read the very same tensor object share one basis.
        seen: dict[str, torch.Tensor] = {}
        leader: dict[str, str] = {}  # layer -> the first layer that read the same tensor
        grams: dict[str, torch.Tensor] = {}
        first_forward = True
        budget = self.settings.tokens
        # Token samples come from a generator of their own, seeded from the run's: the inputs
        # drawn from ``generator`` stay the same whatever the budget.
        picks = torch.Generator().manual_seed((generator.initial_seed() + 1) % 2**63)

        def hook(name: str) -> Callable[..., None]:
            def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                if first_forward:
                    owner = next((n for n, t in seen.items() if t is x), None)
                    leader[name] = leader[owner] if owner else name
                elif leader[name] != name:
                    if seen.get(leader[name]) is not x:
                        raise ConfigError(
                            f"projection: {name!r} read another input than {leader[name]!r} on a later "
                            "protected input; the model's layers share inputs differently from call to call"
                        )
                    seen[name] = x
                    return
                seen[name] = x
                if leader[name] != name:
                    return
                # The product where the input is (a 14B layer's input is too big to move to the
                # CPU each time); only width x width goes to the CPU and is summed there.
                # float64 on the CPU and for the exact (text) side everywhere; on a GPU the
                # video side, whose bases keep a share of the energy anyway, takes float32
                # products (fp64 is 60x slower than fp32 on consumer cards) and float32 sums
                # (a 14B run holds one Gram per input read: half the host memory)
                exact = bool(self._exact.search(name))
                wide = x.device.type == "cpu" or exact
                flat = x.detach().reshape(-1, x.shape[-1])
                rows = flat.shape[0]
                limit = budget * (x.shape[0] if x.dim() >= 3 else 1)  # per item of the batch
                if budget and not exact and rows > limit:
                    # drawn on the CPU, so every device picks the same rows; sorted, so the
                    # Gram sums them in the input's own order
                    keep = torch.randperm(rows, generator=picks)[:limit].sort().values
                    flat = flat[keep.to(flat.device)]
                flat = flat.to(torch.float64 if wide else torch.float32)
                gram = (flat.T @ flat).cpu()
                if flat.shape[0] < rows:
                    gram *= rows / flat.shape[0]  # an unbiased estimate of the whole input's Gram
                if name in grams:
                    grams[name].add_(gram)
                else:
                    grams[name] = gram

            return pre

        batches = 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.handle.teacher():
                # The task may draw with the model here: the hooks are not installed yet.
                items = list(self._batches(model, generator))
                self._hooks = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
                for batch in items:
                    if device is not None:
                        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    seen.clear()
                    with autocast():
                        self.task.preservation_outputs(model, batch)
                    first_forward = False
                    batches += 1
                seen.clear()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            model.train(was_training)
        missing = [n for n in modules if n not in leader]
        if missing or not batches:
            raise ConfigError(
                f"projection: the protected inputs never reached {missing[0] if missing else 'the model'!r}; "
                "it is not used by the model's forward, so it cannot be protected: exclude it"
            )
        self._build(grams, leader, starts)
        return self._summarise(batches)

    def _build(
        self, grams: dict[str, torch.Tensor], leader: dict[str, str], starts: dict[str, torch.Tensor]
    ) -> None:
        proxies = dict(self.handle.proxies())
        by_leader: dict[str, _Group] = {}
        for name in sorted(leader):
            head = leader[name]
            if head not in by_leader:
                width = grams[head].shape[0]
                by_leader[head] = _Group(width=width, exact=True)
            group = by_leader[head]
            group.members.append(name)
            group.exact = group.exact and bool(self._exact.search(name))
        for head, group in by_leader.items():
            gram = grams.pop(head).to(torch.float64)  # one float64 copy at a time
            q = basis_from_gram(gram, self.settings.energy, group.exact)
            group.rank = q.shape[1]
            if group.rank > group.width // 2:
                q = basis_from_gram(gram, self.settings.energy, group.exact, complement=True)
                group.complement = True
            home = "cpu" if self.settings.bases == "cpu" else proxies[group.members[0]].device
            group.basis = q.to(device=home, dtype=torch.float32)
            if home == "cpu" and torch.cuda.is_available():
                group.basis = group.basis.pin_memory()  # so that each move overlaps
        self._groups = list(by_leader.values())
        self._trained = []
        for name, group in ((n, by_leader[leader[n]]) for n in sorted(leader)):
            proxy = proxies[name]
            start = starts[name].to(device=proxy.device, dtype=torch.float32).view(-1, group.width)
            self._trained.append(_Trained(name, proxy, start, group))
        if all(t.group.rank >= t.group.width for t in self._trained):
            first = self._trained[0]
            raise ConfigError(
                f"projection leaves no free direction in any trained row: the protected inputs of "
                f"{first.name!r} span all {first.group.width} of its input directions (and so for every "
                "trained tensor); lower preserve_energy (e.g. 0.95), protect fewer prompts, or train wider "
                "layers"
            )

    def _summarise(self, batches: int) -> ProjectionStats:
        self.stats = ProjectionStats(
            groups=len(self._groups),
            exact_groups=sum(g.exact for g in self._groups),
            trained=len(self._trained),
            trained_rows=sum(t.rows for t in self._trained),
            rows_without_room=sum(t.rows for t in self._trained if t.group.rank >= t.group.width),
            basis_bytes=sum(g.basis.numel() * 4 for g in self._groups if g.basis is not None),
            inputs=batches,
            ranks={g.members[0]: (g.rank, g.width) for g in self._groups},
        )
        return self.stats

    # -- the step ---------------------------------------------------------------------------------
    @staticmethod
    def _off(d: torch.Tensor, group: _Group) -> torch.Tensor:
        """``d (I - Q Q^T)`` for the rows of ``d`` (``[rows, width]``), without forming ``I - Q Q^T``;
        from the complement ``F`` it is ``d F F^T``, the same map."""
        q = group.basis
        assert q is not None
        if q.device != d.device:  # bases kept on the CPU: moved for this product only
            q = q.to(d.device, non_blocking=True)
        if group.complement:
            return (d @ q) @ q.T
        return d - (d @ q) @ q.T if q.shape[1] else d

    def _tensors(self) -> Iterator[_Trained]:
        if self.stats is None:
            raise ConfigError("projection: call collect() (the feature pass) before training")
        for t in self._trained:
            # a client may move the proxies after the feature pass (e.g. a Trainer placing them)
            dev = t.proxy.device
            if t.start.device != dev:
                t.start = t.start.to(dev)
            if self.settings.bases != "cpu" and t.group.basis is not None and t.group.basis.device != dev:
                t.group.basis = t.group.basis.to(dev)
            yield t

    def has_grads(self) -> bool:
        """Whether any trained tensor has a gradient now (after the feature pass)."""
        return any(t.proxy.grad is not None for t in self._trained)

    @torch.no_grad()
    def project_grads(self) -> None:
        """Project each trained tensor's gradient off its protected inputs (before the step)."""
        for t in self._tensors():
            g = t.proxy.grad
            if g is not None:
                g.copy_(self._off(g.view(t.rows, -1).float(), t.group).view_as(g))

    @torch.no_grad()
    def project(self) -> None:
        """Project each trained tensor's change since the start off its protected inputs."""
        for t in self._tensors():
            value = t.proxy.view(t.rows, -1)
            d = self._off(value.float() - t.start, t.group)
            value.copy_((t.start + d).to(value.dtype))

    def install(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        """Hook ``optimizer``: gradients projected before each step, the change after it."""
        hooks = []
        if self.settings.project_grad:
            hooks.append(optimizer.register_step_pre_hook(lambda *_: self.project_grads()))
        hooks.append(optimizer.register_step_post_hook(lambda *_: self.project()))
        return hooks

    def describe(self) -> str:
        """One summary line: prompts, bases, and rows that cannot move."""
        drawn = callable(getattr(self.task, "projection_batches", None))
        source = "the model's own drawings" if drawn else "pure-noise latents (the task draws nothing)"
        line = (
            f"  preservation: projection (energy {self.settings.energy}, {self.settings.draws} x "
            f"{self.settings.times} inputs per prompt from {source}, image-side tokens per input "
            f"{self.settings.tokens or 'all'}); {describe_protected(self.protected)}"
        )
        s = self.stats
        if s is not None:
            sampled = [g.rank / g.width for g in self._groups if not g.exact]
            exact = [g.rank / g.width for g in self._groups if g.exact]

            def spread(xs: list[float]) -> str:
                return f"{sum(xs) / len(xs):.0%} ({min(xs):.0%}-{max(xs):.0%})" if xs else "-"

            line += (
                f"\n  projection: {s.trained} tensors ({s.trained_rows:,} rows) in {s.groups} input groups "
                f"({s.exact_groups} exact, text side); protected rank / width: sampled {spread(sampled)}, "
                f"text {spread(exact)}; bases {s.basis_bytes / 2**20:.1f} MiB; "
                f"{s.rows_without_room:,} trained rows have no free direction"
            )
        return line
