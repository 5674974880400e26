"""Wan 2.2's two experts in one musubi-tuner run (``--dit_high_noise``).

musubi loads the low-noise expert (``--dit``) as the DiT it trains and keeps the high-noise one
(``--dit_high_noise``) as a state dict; for each batch it picks an expert by the timestep and,
when that changes, loads the other expert's weights into the same modules
(``load_state_dict(..., assign=True)``). ffid's trained values are weights, not a shared
adapter, so each expert gets its own proxy set for the same selection (the experts have the same
shapes, so an id picks the same positions in both and stays disjoint from other ids in each).

:class:`TwoExperts` keeps the high-noise set (a parameter dict of the network, so the optimizer,
gradient clipping and ``--save_state`` see it) and its base values, and watches the DiT's
``load_state_dict``: when the weights coming in are the other expert's, the engine is switched to
that expert's set (:meth:`~ffid.engine.FfidHandle.use_proxies`). The expert is recognised by
the incoming values at a sample of the selected positions, not by counting switches.

Output: one ordinary delta per expert, ``NAME.safetensors`` (low noise, musubi's own name) and
``NAME_high_noise.safetensors`` next to it, each fingerprinted against its own expert, so
``ffid merge``, the ComfyUI node and any reader take them as they take any delta and refuse one
given the other expert's file. Both carry ``ffid.expert`` and a shared ``ffid.expert_pair`` id.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.delta import KEY_EXPERT as EXPERT_KEY
from ..errors import ConfigError, MismatchError, MissingFileError, TrainingError
from ..names import canonical_name

logger = logging.getLogger(__name__)

HIGH_SUFFIX = "_high_noise"
PAIR_KEY = "ffid.expert_pair"
PROBE_SIZE = 256


def high_noise_path(file: str | Path) -> Path:
    """The high-noise expert's delta next to the low-noise one: ``NAME_high_noise.safetensors``."""
    p = Path(file)
    return p.with_name(p.stem + HIGH_SUFFIX + p.suffix)


def _probe_positions(count: int) -> torch.Tensor:
    if count <= PROBE_SIZE:
        return torch.arange(count)
    return torch.arange(PROBE_SIZE) * (count - 1) // (PROBE_SIZE - 1)


class TwoExperts(nn.Module):
    """The high-noise expert's proxies and base, and the switch between the experts' sets.

    Registered on the network as ``ffid_high_noise``: its parameters are the high-noise proxies
    (keys as the handle's proxy keys), so ``network.parameters()`` and the saved state hold both.
    """

    def __init__(
        self, handle: Any, high_path: str, base_weights: list[tuple[Path, float]] | None = None
    ) -> None:
        super().__init__()
        # the high-noise halves of earlier two-expert characters (--base_weights), written into the
        # high-noise weights when musubi first loads them (musubi merges into --dit only)
        self.pending = list(base_weights or [])
        from .musubi_fp8 import file_values

        object.__setattr__(self, "_handle", handle)
        self.high_path = high_path
        sel = handle.selection
        keys = handle.proxy_keys()
        from .musubi_fp8 import narrowed_names

        scaled = set(narrowed_names(handle))
        values = file_values(high_path, {name: sel.indices(name) for name in keys})
        own = dict(handle.proxies())
        self.base: dict[str, torch.Tensor] = {}
        for name, v in values.items():
            if name not in scaled:
                # what musubi holds after loading the file: the DiT's dtype (elements of fp8-held
                # tensors start from the file's values, as the low-noise expert's do)
                dtype = handle.model_dtype(name)
                if dtype is not None and dtype.is_floating_point:
                    v = v.to(dtype).to(torch.float32)
            self.base[name] = v
        self.proxies = nn.ParameterDict(
            {
                keys[name]: nn.Parameter(
                    self.base[name].to(device=own[name].device, dtype=own[name].dtype, copy=True)
                )
                for name in keys
            }
        )
        # the low-noise expert's base is fixed now: later switches replace the Parameters that
        # the engine first saw, so its snapshot must not be read from them again
        self.low_base = handle.base_values()
        handle.set_base_values(self.low_base)  # kept by reference: one host copy
        self.active = "low_noise"
        self._probe: dict[str, torch.Tensor | None] = {"low_noise": None, "high_noise": None}
        self._probe_name = max(keys, key=lambda n: sel[n].count)
        self._probe_at = sel.indices(self._probe_name)[_probe_positions(sel[self._probe_name].count)]
        self._hook: Any = None

    # -- the switch ---------------------------------------------------------------------------
    def install(self, unet: nn.Module) -> None:
        """Watch ``unet.load_state_dict`` (musubi's expert switch)."""
        self._probe["low_noise"] = self._read_probe(dict(unet.named_parameters()))
        self._hook = unet.register_load_state_dict_pre_hook(self._on_load)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _read_probe(self, tensors: dict[str, Any]) -> torch.Tensor:
        for key, t in tensors.items():
            if canonical_name(key) == self._probe_name and isinstance(t, torch.Tensor):
                flat = t.detach().reshape(-1)
                return flat[self._probe_at.to(flat.device)].to("cpu").view(torch.uint8).clone()
        raise TrainingError(
            f"the state dict musubi loaded into the DiT has no tensor {self._probe_name!r}; ffid cannot tell "
            "which Wan 2.2 expert it is"
        )

    def _on_load(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix:
            return  # a submodule's own load: the root's call already decided
        probe = self._read_probe(state_dict)
        if torch.equal(probe, self._probe["low_noise"]):  # type: ignore[arg-type]
            expert = "low_noise"
        elif self._probe["high_noise"] is None or torch.equal(probe, self._probe["high_noise"]):
            expert = "high_noise"
            self._probe["high_noise"] = probe
        else:
            raise TrainingError(
                "musubi loaded weights of neither Wan 2.2 expert into the DiT (they match neither --dit "
                "nor the high-noise weights seen before); ffid cannot tell which trained values to use"
            )
        if expert == "high_noise" and self.pending:
            self._merge_pending(state_dict)
        if expert != self.active:
            logger.info("ffid: musubi switched the DiT to the %s expert; training its values", expert)
        self.switch(expert)

    def _merge_pending(self, state_dict: dict) -> None:
        """Write the earlier characters' high-noise deltas into the incoming high-noise weights
        (in place: musubi assigns these tensors), checked against their base fingerprints."""
        from ..checkpoint.delta import blend, expert_hint, load_delta, sample_positions, values_hash
        from ..checkpoint.namemap import NameResolver
        from ..engine.scaled import read_at, write_at

        by_name = {canonical_name(k): k for k in state_dict}
        for path, multiplier in self.pending:
            delta = load_delta(path)
            resolver = NameResolver(by_name, delta.info.naming)
            plan = []
            for name, dt in delta.tensors.items():
                target = resolver.resolve(name)
                if target is None:
                    raise MismatchError(
                        f"{path.name}: tensor {name!r} is not in the high-noise expert's weights"
                    )
                key = by_name[target]
                t = state_dict[key]
                scale_key = key[: -len("weight")] + "scale_weight" if key.endswith("weight") else None
                scale = state_dict.get(scale_key) if scale_key else None
                idx = dt.indices.to(t.device)
                base = read_at(t, scale, idx)
                fp = delta.info.base_fingerprint.get(name)
                # fp8 weights (scaled or --fp8_base) hold copies of the file's values, which the
                # fingerprint hashes: only wider weights can be checked
                if scale is None and fp is not None and t.element_size() > 1:
                    got = values_hash(base[sample_positions(dt.count).to(base.device)])
                    if got != fp.hash:
                        raise MismatchError(
                            f"--base_weights {path.name} was not trained from the high-noise expert "
                            f"(tensor {name!r} holds other values){expert_hint(delta.metadata)}"
                        )
                plan.append((t, idx, blend(base, dt.values.to(base.device), multiplier), scale))
            for t, idx, new, scale in plan:  # all checked first: nothing half-merged
                write_at(t, scale, idx, new)
            logger.info("ffid: merged %s into the high-noise expert (multiplier %s)", path.name, multiplier)
        self.pending = []

    def switch(self, expert: str) -> None:
        """Make the engine train ``expert``'s set (``"low_noise"`` or ``"high_noise"``)."""
        if expert == self.active:
            return
        if expert == "high_noise":
            self._handle.use_proxies(dict(self.proxies.items()), self.base)
        else:
            self._handle.use_proxies(None)
        self.active = expert

    def sets(self) -> list[tuple[str, dict[str, nn.Parameter], dict[str, torch.Tensor]]]:
        """``(expert, name -> proxy, name -> base values)`` for both experts."""
        keys = self._handle.proxy_keys()
        low = {name: self._handle._parameters[key] for name, key in keys.items()}
        high = {name: self.proxies[key] for name, key in keys.items()}
        return [("low_noise", low, self.low_base), ("high_noise", high, self.base)]

    # -- files --------------------------------------------------------------------------------
    def save(self, file: str, metadata: dict[str, str], save_dtype: Any, text: Any = None) -> Path:
        """Write the high-noise delta next to ``file``, then ``file`` (the low-noise delta); both
        store the same ``text`` encodings (the run's captions are the same for both experts)."""
        high = high_noise_path(file)
        pair = self._pair_id()
        before = self.active
        try:
            self.switch("high_noise")
            md = {**metadata, EXPERT_KEY: "high_noise", PAIR_KEY: f"{pair} {Path(file).name}"}
            self._handle.save_delta(high, metadata=md, save_dtype=save_dtype, text=text)
            self.switch("low_noise")
            md = {**metadata, EXPERT_KEY: "low_noise", PAIR_KEY: f"{pair} {high.name}"}
            self._handle.save_delta(file, metadata=md, save_dtype=save_dtype, text=text)
        finally:
            self.switch(before)
        return high

    def _pair_id(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for _, proxies, _ in self.sets():
            for name in sorted(proxies):
                h.update(proxies[name].detach().to("cpu", torch.float32).numpy().tobytes()[:4096])
        return h.hexdigest()

    def load(self, file: str, load_one: Any) -> str:
        """``--network_weights`` of a two-expert run: ``file`` and its high-noise file, same pair."""
        from ..checkpoint.stio import SafetensorsFile

        def pair_of(path: str | Path) -> str:
            with SafetensorsFile(path) as f:
                return str(f.metadata.get(PAIR_KEY, "")).split(" ")[0]

        high = high_noise_path(file)
        if not high.is_file():
            raise MissingFileError(
                f"{high} is missing: a two-expert run (--dit_high_noise) continues from both experts' "
                f"deltas, {Path(file).name} and {high.name} next to it; pass the low-noise one as "
                "--network_weights"
            )
        pairs = [pair_of(p) for p in (file, high)]
        if not pairs[0] or pairs[0] != pairs[1]:
            raise MismatchError(
                f"{Path(file).name} and {high.name} were not saved together (expert pair ids "
                f"{pairs[0] or '-'} and {pairs[1] or '-'}); give the low-noise delta of one two-expert save"
            )
        before = self.active
        try:
            self.switch("low_noise")
            low_info = load_one(file)
            self.switch("high_noise")
            load_one(str(high))
        finally:
            self.switch(before)
        return f"{low_info}; high-noise expert from {high.name}"


def high_noise_base_weights(args: Any) -> list[tuple[Path, float]]:
    """The high-noise twins of ``--base_weights`` files that name the low-noise expert.

    musubi merges each ``--base_weights`` file into ``--dit`` (the low-noise expert) only. For a
    delta ffid saved from a two-expert run, the twin ``NAME_high_noise.safetensors`` goes into the
    high-noise expert, with the same multiplier. A delta of one expert only is refused: the
    other expert would train without that character.
    """
    from ..checkpoint.stio import SafetensorsFile

    paths = list(getattr(args, "base_weights", None) or [])
    multipliers = list(getattr(args, "base_weights_multiplier", None) or [])
    out = []
    for i, p in enumerate(paths):
        with SafetensorsFile(p) as f:
            expert = f.metadata.get(EXPERT_KEY)
        if expert == "high_noise":
            raise ConfigError(
                f"--base_weights {p} is a high-noise expert's delta; give its low-noise twin "
                f"({Path(p).name.replace(HIGH_SUFFIX, '')}): ffid merges this one into the high-noise "
                "expert itself"
            )
        twin = high_noise_path(p)
        if expert != "low_noise":
            raise ConfigError(
                f"--base_weights {p} holds one expert's values (no ffid.expert key), but this run trains "
                "both Wan 2.2 experts; give the deltas of a two-expert run (NAME.safetensors with "
                "NAME_high_noise.safetensors next to it), or train one expert (drop --dit_high_noise)"
            )
        if not twin.is_file():
            raise MissingFileError(
                f"{twin} is missing: --base_weights {Path(p).name} needs its high-noise twin next to it"
            )
        out.append((twin, float(multipliers[i]) if i < len(multipliers) else 1.0))
    return out


def check_args(args: Any, preserving: str | None) -> str | None:
    """The ``--dit_high_noise`` path when both experts are trained (refusals in one line).

    ``preserving`` is the preservation method (``None`` without preservation)."""
    high = getattr(args, "dit_high_noise", None)
    if not high:
        return None
    if preserving == "loss":
        raise ConfigError(
            "the preservation loss with both Wan 2.2 experts (--dit_high_noise) is not supported: its "
            "extra forwards would run through whichever expert is loaded; protect by projection "
            "(network_args preserve_method=projection selector=rows), which protects each expert "
            "through its own forwards, or drop the preserve_* network_args"
        )
    return str(high)


def boundary_of(args: Any) -> float:
    """The expert boundary on the 0..1 time scale: ``--timestep_boundary`` (musubi takes values
    above 1 as 0..1000), else the task's own (Wan 2.2 A14B: 0.875 t2v, 0.9 i2v)."""
    b = getattr(args, "timestep_boundary", None)
    if b is None:
        try:
            from musubi_tuner.wan.configs import WAN_CONFIGS  # only inside a musubi run

            b = getattr(WAN_CONFIGS[args.task], "boundary", None)
        except (ImportError, KeyError, AttributeError):
            b = None
    if b is None:
        raise ConfigError(
            "both Wan 2.2 experts with projection need the expert boundary; pass --timestep_boundary "
            "(e.g. 875 for t2v-A14B)"
        )
    b = float(b)
    return b / 1000.0 if b > 1 else b
