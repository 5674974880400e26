"""A musubi-tuner (and sd-scripts style) network module: selective full finetuning without a fork.

Use it with an unmodified musubi-tuner::

    accelerate launch src/musubi_tuner/wan_train_network.py ... \\
        --network_module ffid.integrations.musubi --network_args "ff=0.01" "ffid=1"

musubi-tuner trains "a network" whose parameters it gives to the optimizer. Here the network is
an :class:`FfidNetwork` wrapping an :class:`~ffid.engine.FfidHandle`: its only parameters are the
fp32 proxies of the selected elements of the DiT's own weights, and the DiT's forward uses them at
every call (so sampling mid-training sees the trained values). Checkpoints are ffid delta files
(musubi's ``ss_*`` / ``modelspec.*`` metadata included) that ``ffid merge`` bakes into the
original checkpoint for ComfyUI or musubi inference.

musubi's ``--fp8_scaled`` is trained through its own scaled-fp8 product, the trained elements
starting from the ``--dit`` file (:mod:`ffid.integrations.musubi_fp8`); Wan 2.2's two experts
(``--dit_high_noise``) get one trained set and one delta each
(:mod:`ffid.integrations.musubi_experts`); ``--block_swap_h2d_only`` is refused.

``--network_args`` (``key=value`` strings; musubi splits on ``=``, so values cannot contain one):

==================  ================================================================================
``ff``              fraction of the model to train, 0 < ff <= 1 (required)
``ffid``            selection id; different ids never touch the same weight (required)
``selector``        ``spread`` (default) or ``compat-v2`` (the original whole-tensor v2.0 algorithm)
``slots``, ``seed`` ``spread`` layout options (number of disjoint ids, default 16; seed 0)
``include``         regexes searched in tensor names, separated by ``;``: only matching tensors
``exclude``         regexes separated by ``;``: matching tensors are never trained
``block_pattern``   regex with one group finding the block number (default finds ``blocks.N.``)
``save_dtype``      value precision of saved deltas: ``fp32`` (default), ``bf16``, ``fp16`` or
                    ``auto`` (musubi's ``--save_precision``, fp32 by default)
``store_encodings`` ``true`` (default): each delta records its run's captions and stores the text
                    encodings of the first 64 (:mod:`ffid.integrations.musubi_encodings`)
``preserve_cache``  more protected prompts: musubi text-encoder cache folders, ``;``-separated; any
                    ``preserve_*`` key protects the captions the ``--base_weights`` deltas store
``preserve_method`` ``loss`` (default: a preservation loss, two extra forwards per step, refused
                    under block swap) or ``projection`` (needs ``selector=rows``; one feature pass,
                    then each step's change is kept off the protected prompts' inputs; works with
                    ``--blocks_to_swap``, fp8, accumulation and resume)
``preserve_*``      ``preserve_prompts`` (captions to take, default all); loss: ``preserve_weight``
                    (16), ``preserve_items`` (1 per forward), ``preserve_every`` (1); projection:
                    ``preserve_energy`` (0.99), ``preserve_draws`` (4), ``preserve_times`` (2),
                    ``preserve_steps`` (10), ``preserve_bases`` (``device``; ``cpu``: host memory)
==================  ================================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import AttachError, ConfigError, MismatchError, TrainingError
from ._common import refuse_sharding
from .musubi_args import NETWORK_ARGS, MusubiConfig, parse_network_args  # noqa: F401 (the module's API)
from .musubi_projection import DEFAULT_SHIFT
from .musubi_weights import _delta_from_weights

logger = logging.getLogger(__name__)


def _architecture_suffixed(arch: str) -> str:
    """``wan2.1-t2v-14b/lora`` -> ``wan2.1-t2v-14b/ffid-delta``: a delta is not a LoRA."""
    return arch.rsplit("/", 1)[0] + "/ffid-delta" if "/" in arch else arch + "/ffid-delta"


class FfidNetwork(nn.Module):
    """The object musubi-tuner trains: an :class:`~ffid.engine.FfidHandle` behind musubi's network API.

    Its only parameters are the handle's fp32 proxies, and its ``state_dict()`` is the proxies plus
    the selection fingerprint (what ``--save_state`` stores: ``4 * ff * N`` bytes, not the model).
    The DiT is referenced, never registered as a submodule.
    """

    def __init__(
        self,
        config: MusubiConfig | None,
        unet: nn.Module | None = None,
        multiplier: float = 1.0,
        selection: Any = None,
    ):
        super().__init__()
        self.config = config
        self.multiplier = multiplier
        self.selection = selection
        self.handle: Any = None  # the FfidHandle, registered as a submodule once applied
        object.__setattr__(self, "_unet", unet)
        self._warned_dtype = False
        self._base_on_device: dict[str, torch.Tensor] | None = None
        self._pending_weights: dict[str, torch.Tensor] | None = None  # create_arch_network_from_weights
        self.args_seen: dict[str, Any] = {}
        self.preservation: Any = None  # MusubiPreservation / MusubiProjection with preserve_* keys
        self.preservation_high: Any = None  # both Wan 2.2 experts: the high-noise expert's projector
        if config is not None and config.preserve_method == "projection":
            from .musubi_projection import empty_record

            # the first training call's latent shape, saved with --save_state so that a resumed
            # run rebuilds the same bases (see musubi_projection)
            self.register_buffer("ffid_projection_record", empty_record())
        if selection is None and unet is not None and config is not None:
            self.selection = self._plan(unet)

    # -- setup ----------------------------------------------------------------------------------
    def _plan(self, unet: nn.Module) -> Any:
        assert self.config is not None
        return self.config.selection.plan(unet)

    def prepare_network(self, args: Any) -> None:
        """Called by musubi with its argparse namespace before :meth:`apply_to`; records the setup."""
        for key in (
            "mixed_precision",
            "fp8_base",
            "fp8_scaled",
            "blocks_to_swap",
            "gradient_checkpointing",
            "optimizer_type",
            "full_bf16",
            "full_fp16",
        ):
            if hasattr(args, key):
                self.args_seen[key] = getattr(args, key)
        try:
            from accelerate import PartialState

            refuse_sharding(PartialState().distributed_type)
        except ImportError:  # pragma: no cover - musubi always has accelerate
            pass
        from .musubi_experts import check_args, high_noise_base_weights

        # both Wan 2.2 experts in this run: one proxy set each (see musubi_experts)
        c = self.config
        self._high_noise_path = check_args(
            args, c.preserve_method if c is not None and c.preserving else None
        )
        self._high_noise_base = high_noise_base_weights(args) if self._high_noise_path else []
        if self._high_noise_path and c is not None and c.preserving:
            from .musubi_experts import boundary_of

            self._boundary = boundary_of(args)
        if self.config is not None and self.config.preserving:
            projection = self.config.preserve_method == "projection"
            if getattr(args, "blocks_to_swap", 0) and not projection:
                raise ConfigError(
                    "ffid's preservation loss runs extra DiT forwards inside each training step, which "
                    "musubi's block swap does not schedule; protect by projection instead (network_args "
                    "preserve_method=projection selector=rows: one feature pass, no extra forward per step), "
                    "or drop --blocks_to_swap"
                )
            self._preserve_seed = int(getattr(args, "seed", None) or 0)
            # musubi's accelerator divides the loss by the accumulation steps; the term tied to
            # the output gets the same scale
            self._preserve_scale = 1.0 / max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
            self._flow_shift = float(getattr(args, "discrete_flow_shift", None) or DEFAULT_SHIFT)
        if getattr(args, "block_swap_h2d_only", False) and getattr(args, "blocks_to_swap", 0):
            raise ConfigError(
                "--block_swap_h2d_only rebinds each streamed Linear weight to a GPU ring buffer by assigning "
                "the object module.weight returns, which for a weight ffid trains is a computed tensor, not "
                "the Parameter, so musubi's rebinding fails; drop --block_swap_h2d_only and keep "
                "--blocks_to_swap (musubi's default swap, which ffid supports)"
            )
        # --fp8_base/--fp8_scaled: the trained elements start from this file's values (musubi_fp8)
        self._dit_path = getattr(args, "dit", None)
        if self.config is not None:  # the run's captions, for its deltas; earlier ones, to protect
            from .musubi_encodings import RunText

            self._run_text = RunText.from_args(args, self.config.store_encodings)
            self._base_weight_files = list(getattr(args, "base_weights", None) or [])

    def apply_to(
        self, text_encoders: Any, unet: nn.Module, apply_text_encoder: bool = False, apply_unet: bool = True
    ) -> None:
        """Attach the selection to the DiT (``unet``): the step after which its forward uses the proxies."""
        from ..engine import attach

        if self.handle is not None:
            raise AttachError(
                "this ffid network is already applied to a model; create a new network to apply again"
            )
        if not apply_unet:
            raise ConfigError("ffid trains the DiT's own weights; apply_unet=False leaves nothing to train")
        if apply_text_encoder:
            logger.warning("ffid: text encoders are not trained (musubi-tuner does not train them either)")
        object.__setattr__(self, "_unet", unet)
        if self.selection is None:
            if self._pending_weights is not None:
                self.selection = self._selection_from_weights(self._pending_weights, unet)
            else:
                self.selection = self._plan(unet)
        self.handle = attach(unet, self.selection)
        from .musubi_fp8 import narrowed_names

        if narrowed_names(self.handle):
            from .musubi_fp8 import start_from_file

            try:
                start_from_file(self.handle, getattr(self, "_dit_path", None))
            except Exception:
                self.handle.detach()  # refused: the DiT is left as it was
                self.handle = None
                raise
        if getattr(self, "_high_noise_path", None):
            from .musubi_experts import TwoExperts

            try:
                self.ffid_high_noise = TwoExperts(self.handle, self._high_noise_path, self._high_noise_base)
            except Exception:
                self.handle.detach()
                self.handle = None
                raise
            self.ffid_high_noise.install(unet)
            logger.info(
                "ffid: both Wan 2.2 experts, one trained set each (high noise from %s); deltas "
                "NAME.safetensors (low noise) and NAME_high_noise.safetensors",
                self._high_noise_path,
            )
        logger.info("%s", self.handle.describe())
        if self.config is not None and self.config.preserving:
            self._install_preservation(unet)

    def _install_preservation(self, unet: nn.Module) -> None:
        from ..preserve.stored import model_text_width
        from .musubi_encodings import protected_encodings

        c = self.config
        assert c is not None
        try:
            bases = getattr(self, "_base_weight_files", [])
            width = model_text_width(unet)
            encodings = protected_encodings(
                bases, c.preserve_cache, c.preserve_prompts, width, merged=c.preserve_deltas
            )
            if c.preserve_method == "projection":
                from .musubi_projection import MusubiProjection

                experts = getattr(self, "ffid_high_noise", None)
                ranges: list[Any] = [None]
                if experts is not None:  # one projector per expert, each in its own time range

                    def active() -> str:
                        return str(experts.active)

                    b = self._boundary
                    ranges = [("low_noise", active, 0.0, b), ("high_noise", active, b, 1.0)]
                made = [
                    MusubiProjection(
                        self.handle,
                        encodings,
                        c.projection,
                        self.ffid_projection_record,
                        seed=getattr(self, "_preserve_seed", 0),
                        shift=getattr(self, "_flow_shift", DEFAULT_SHIFT),
                        expert=r,
                    )
                    for r in ranges
                ]
                self.preservation = made[0]
                self.preservation_high = made[1] if len(made) > 1 else None
            else:
                from .musubi_preserve import MusubiPreservation

                self.preservation = MusubiPreservation(
                    self.handle,
                    encodings,
                    c.preserve,
                    seed=getattr(self, "_preserve_seed", 0),
                    grad_scale=getattr(self, "_preserve_scale", 1.0),
                )
        except Exception:
            self.handle.detach()  # refused: the DiT is left as it was
            self.handle = None
            raise
        self.preservation.install(unet)
        if getattr(self, "preservation_high", None) is not None:
            self.preservation_high.install(unet)
        shown = ", ".join(repr(p) for p in list(encodings)[:4]) + (" ..." if len(encodings) > 4 else "")
        if c.preserve_method == "projection":
            logger.info(
                "ffid preservation: projection (energy %s, %d drawing(s) x %d time(s) per prompt, feature "
                "pass at the first training step); protecting %d prompt(s): %s",
                c.projection.energy,
                c.projection.draws,
                c.projection.times,
                len(encodings),
                shown,
            )
            return
        logger.info(
            "ffid preservation: weight %s, %d protected input(s) every %d forward(s), teacher = the DiT as "
            "loaded (base + --base_weights); protecting %d prompt(s): %s",
            c.preserve.weight,
            c.preserve.items,
            c.preserve.every,
            len(encodings),
            shown,
        )

    def _require_handle(self, what: str) -> Any:
        if self.handle is None:
            raise AttachError(f"{what} needs the network applied first; musubi calls apply_to() before it")
        return self.handle

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, file: str) -> str:
        """Continue from a delta file (``--network_weights``): the proxies take its trained values
        (both experts' files in a two-expert run)."""
        self._require_handle("load_weights")
        experts = getattr(self, "ffid_high_noise", None)
        if experts is not None:
            return str(experts.load(file, self._load_one))
        return self._load_one(file)

    def _load_one(self, file: str) -> str:
        from ..checkpoint.delta import load_delta, values_hash

        handle = self._require_handle("load_weights")
        sel = handle.selection
        delta = load_delta(file, base=sel.manifest)  # implicit-index deltas rebuild positions from it
        if delta.info.selection_fingerprint != sel.fingerprint:
            raise MismatchError(
                f"{file} was trained on selection {delta.info.selection_fingerprint or '?'} "
                f"({delta.info.selector} {_describe(delta.info.params)}) but this run trains "
                f"{sel.fingerprint} ({sel.selector} {sel.describe_params()}); use the same network_args, "
                "or merge it into the base "
                "with --base_weights / `ffid merge` to train another id on top"
            )
        base = handle.base_sample()  # taken at attach: no read of weights block swap may move
        for name, fp in delta.info.base_fingerprint.items():
            b = base.get(name)
            if b is not None and values_hash(b) != fp.hash:
                raise MismatchError(
                    f"{file} was trained from another base model (tensor {name!r} differs); "
                    "load the same --dit "
                    "checkpoint the delta was trained on"
                )
        handle.load_values(delta.values())
        return (
            f"ffid: {delta.selected:,} trained values in {len(delta)} tensors (selection {sel.fingerprint})"
        )

    def save_weights(
        self, file: str, dtype: torch.dtype | None = None, metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Write the trained values as an ffid delta file, musubi's metadata merged in.

        ``dtype`` (musubi's save precision) is used only with ``save_dtype=auto``: by default
        values are saved in fp32 so that continuing from the file loses nothing.
        """
        handle = self._require_handle("save_weights")
        md = {str(k): str(v) for k, v in (metadata or {}).items()}
        if "modelspec.architecture" in md:
            md["modelspec.architecture"] = _architecture_suffixed(md["modelspec.architecture"])
        save_dtype = self.config.save_dtype if self.config is not None else torch.float32
        if save_dtype is None:
            save_dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        run_text = getattr(self, "_run_text", None)
        text = run_text.read() if run_text is not None else None  # both experts carry the same
        md = run_text.metadata(md) if run_text is not None else md
        experts = getattr(self, "ffid_high_noise", None)
        if experts is not None:
            high = experts.save(file, md, save_dtype, text)
            logger.info(
                "ffid: saved deltas %s and %s (%s values each)", file, high, f"{handle.selection.selected:,}"
            )
            return
        handle.save_delta(file, metadata=md, save_dtype=save_dtype, text=text)
        logger.info("ffid: saved delta %s (%s values)", file, f"{handle.selection.selected:,}")

    def merge_to(
        self,
        text_encoders: Any,
        unet: nn.Module,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
    ) -> None:
        """Bake a delta (``--base_weights``) into ``unet``: ``base + multiplier * (trained - base)``.

        musubi hands over the file's tensors without its metadata, so the base fingerprint cannot
        be checked here; ``ffid merge`` / :func:`ffid.checkpoint.apply_delta` check it.
        """
        weights = weights_sd if weights_sd is not None else self._pending_weights
        if weights is None:
            if self.handle is None:
                raise ConfigError(
                    "merge_to needs weights_sd (the delta file's tensors) or an applied network"
                )
            self.handle.merge()
            return
        delta = _delta_from_weights(weights, unet)
        from .musubi_fp8 import merge_scaled

        merge_scaled(unet, delta, self.multiplier)  # apply_delta, and scaled fp8 weights (--fp8_scaled)
        logger.info(
            "ffid: merged %s values in %d tensors (multiplier %s)",
            f"{delta.selected:,}",
            len(delta),
            self.multiplier,
        )

    def _selection_from_weights(self, weights: Mapping[str, torch.Tensor], unet: nn.Module) -> Any:
        return _delta_from_weights(weights, unet).selection(unet)

    # -- musubi's training-loop calls ----------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the engine's forward paths hold no state, so recomputation just works."""

    def prepare_optimizer_params(
        self, unet_lr: float | None = None, **kwargs: Any
    ) -> tuple[list[dict], list[str]]:
        """One parameter group with every proxy (``lr`` = ``unet_lr`` when given)."""
        handle = self._require_handle("prepare_optimizer_params")
        self.requires_grad_(True)
        group: dict[str, Any] = {"params": list(handle.parameters())}
        experts = getattr(self, "ffid_high_noise", None)
        if experts is not None:
            group["params"] += list(experts.parameters())
        if unet_lr is not None:
            group["lr"] = unet_lr
        return [group], ["ffid"]

    def to(self, *args: Any, **kwargs: Any) -> FfidNetwork:
        """Move the proxies; a request to make them bf16/fp16 is ignored with a warning.

        musubi's ``--full_bf16`` calls ``network.to(bf16)``. ffid keeps its trained values in fp32 on
        purpose: in bf16 most single updates of a weight are smaller than its rounding step and
        would be lost (the DiT's own weights stay in whatever dtype they are).
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != torch.float32:
            if not self._warned_dtype:
                logger.warning(
                    "ffid: network.to(%s) ignored: the trained values stay fp32 so that small updates "
                    "are not "
                    "rounded away (the DiT keeps its own dtype)",
                    dtype,
                )
                self._warned_dtype = True
            if device is None:
                return self
            return super().to(device=device, non_blocking=non_blocking)
        return super().to(*args, **kwargs)

    def prepare_grad_etc(self, transformer: nn.Module) -> None:
        """The proxies require gradients; the DiT's weights stay frozen."""
        self.requires_grad_(True)

    def on_epoch_start(self, transformer: nn.Module) -> None:
        self.train()

    def on_step_start(self) -> None:
        """Stop at the first step after a trained value became NaN/inf (musubi would train on).

        musubi builds the optimizer itself, so ffid cannot hook its step; checking the values
        here costs one small reduction per step and keeps a broken run from going on for hours.
        """
        bad = self._require_handle("on_step_start").nonfinite(grads=False)
        experts = getattr(self, "ffid_high_noise", None)
        if experts is not None:
            bad += [
                f"{n} (high noise)" for n, p in experts.proxies.items() if not bool(torch.isfinite(p).all())
            ]
        if bad:
            raise TrainingError(
                f"trained values of {', '.join(bad[:3])} became NaN/inf at the last optimizer step; "
                "lower --learning_rate or set --max_grad_norm, and resume from the last saved state"
            )

    def get_trainable_params(self) -> list[nn.Parameter]:
        """The proxies (musubi clips their gradient norm)."""
        return list(self.parameters())

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm: float, device: Any) -> tuple[int, float, float]:
        """``--scale_weight_norms``: scale each tensor's update (trained - base) to L2 norm <= ``max_norm``.

        Returns ``(tensors scaled, mean update norm, largest update norm)`` after scaling.
        """
        handle = self._require_handle("apply_max_norm_regularization")
        experts = getattr(self, "ffid_high_noise", None)
        sets = experts.sets() if experts is not None else [("", dict(handle.proxies()), None)]
        if self._base_on_device is None:
            self._base_on_device = {}
            for expert, proxies, base in sets:
                base = base if base is not None else handle.base_values()
                for name, p in proxies.items():
                    self._base_on_device[expert + name] = base[name].to(p.device)
        scaled = 0
        norms = []
        for expert, proxies, _ in sets:
            for name, p in proxies.items():
                b = self._base_on_device[expert + name]
                diff = p - b
                norm = float(diff.norm())
                if norm > max_norm:
                    p.copy_(b + diff * (max_norm / norm))
                    norm = max_norm
                    scaled += 1
                norms.append(norm)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The proxies and the selection fingerprint, nothing of the DiT (``--save_state`` stays small)."""
        self._require_handle("state_dict")
        return super().state_dict(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the network calls the DiT (musubi never does; DDP wrappers may)."""
        return self._require_handle("forward")(*args, **kwargs)


def _describe(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if v not in (None, [], ()))


class NetworkAndWeights(tuple):
    """``(network, weights_sd)`` that also behaves as the network.

    musubi-tuner unpacks ``create_arch_network_from_weights`` as a pair for ``--dim_from_weights``
    but calls ``.merge_to`` on the result directly for ``--base_weights``; this serves both.
    """

    def __new__(cls, network: FfidNetwork, weights_sd: Mapping[str, torch.Tensor]) -> NetworkAndWeights:
        return super().__new__(cls, (network, weights_sd))

    def __getattr__(self, name: str) -> Any:
        return getattr(self[0], name)


def create_arch_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> FfidNetwork:
    """musubi's entry point: the network for ``--network_args`` (``ff=``, ``ffid=``, ...) on DiT ``unet``.

    ``network_dim`` / ``network_alpha`` are LoRA notions and ignored; a dropout is refused because
    ffid trains the weights themselves.
    """
    if neuron_dropout:
        raise ConfigError(
            f"--network_dropout {neuron_dropout} is a LoRA option; ffid trains the weights themselves, "
            "drop it"
        )
    if network_dim is not None:
        logger.info("ffid: --network_dim %s ignored (a LoRA rank; ffid's size is set by ff=)", network_dim)
    config = parse_network_args(kwargs)
    network = FfidNetwork(config, unet, multiplier)
    if network.selection is not None:
        logger.info("ffid: %r", network.selection)
    return network


create_network = create_arch_network  # the name LyCORIS-style loaders try


def prepare_network(network: FfidNetwork, args: Any) -> None:
    """Run ``network.prepare_network(args)`` (the refusals of FSDP/DeepSpeed, ``--dit_high_noise``
    and ``--block_swap_h2d_only``; the ``--dit`` path ``--fp8_scaled`` reads).

    musubi-tuner 0.3.4 calls ``network.prepare_network(args)`` only when the *module* has an
    attribute of that name (``hasattr(network_module, "prepare_network")``): this function is that
    attribute. Without it the method on the network is never called.
    """
    network.prepare_network(args)


def create_arch_network_from_weights(
    multiplier: float,
    weights_sd: Mapping[str, torch.Tensor],
    unet: nn.Module | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> NetworkAndWeights:
    """A network for the exact positions stored in ``weights_sd`` (a delta file's tensors).

    Used by ``--base_weights`` (``.merge_to`` bakes the delta into the DiT with ``multiplier``).
    ``--dim_from_weights`` would use it to train those same positions again, but in musubi 0.3.4
    that flag is a store_true whose ``True`` is then passed to ``load_file`` (broken for every
    network). Returns ``(network, weights_sd)``.
    """
    network = FfidNetwork(None, None, multiplier)
    network._pending_weights = dict(weights_sd)
    if unet is not None:
        network.selection = network._selection_from_weights(weights_sd, unet)
        object.__setattr__(network, "_unet", unet)
    return NetworkAndWeights(network, weights_sd)
