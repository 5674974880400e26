"""Resumable training states: one ``{output_name}-step{step:08d}-state/`` folder per save.

A state holds everything that decides what the next step computes: the trained values (the
engine's proxies), optimizer and scheduler state, every RNG the run draws from, the data
position, the step, the loss history and the gradient path each weight took (``grad_paths`` in
``state.json``: the engine's ``auto`` rule is fixed, so a resume takes the same paths anyway;
pinning them keeps states written by older ffid, whose choice was timed, resuming exactly). It
also records the config hash, the selection fingerprint and the model manifest fingerprint, so a
state from another run is refused.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import MismatchError, MissingFileError, ModelFileError
from .io import commit_dir, recover_dir, recover_dirs, temp_dir_for

STATE_FORMAT = "ffid-train-state/1"


@dataclass
class RunIdentity:
    """What a state must share with the run that resumes it."""

    config_hash: str
    selection_fingerprint: str
    manifest_fingerprint: str
    trajectory_keys: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch (epoch, index)."""

    step: int = 0
    epoch: int = 0
    index: int = 0


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the run draws from (torch CPU/CUDA, the task's generator, python, numpy)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # Plain values and a tensor only, so the state loads with ``torch.load(weights_only=True)``.
        state["numpy"] = (
            str(kind),
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(
            (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached)
        )


def save_state(
    folder: Path,
    *,
    identity: RunIdentity,
    position: Position,
    proxies: dict[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    rng: dict[int, dict[str, Any]],
    losses: list[float],
    grad_paths: dict[int, dict[str, str]] | None = None,
) -> Path:
    """Write a state folder atomically (temp folder, then rename); returns ``folder``.

    ``grad_paths`` (rank -> ``handle.grad_paths()`` of that process) is stored so that a resume
    takes the same path per weight on every process (``handle.pin_grad_paths``) even where a
    path was forced; :func:`grad_paths_of` reads it back.
    """
    from safetensors.torch import save_file

    tmp = temp_dir_for(folder)
    try:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in proxies.items()},
            str(tmp / "proxies.safetensors"),
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, state in rng.items():
            torch.save(state, tmp / f"rng-{rank}.pt")
        meta = {
            "format": STATE_FORMAT,
            "ffid_version": __version__,
            "step": position.step,
            "epoch": position.epoch,
            "index": position.index,
            "config_hash": identity.config_hash,
            "selection_fingerprint": identity.selection_fingerprint,
            "manifest_fingerprint": identity.manifest_fingerprint,
            "world_size": identity.world_size,
            "trajectory_keys": identity.trajectory_keys,
            "losses": losses,
            "grad_paths": dict(sorted((grad_paths or {}).get(0, {}).items())),
            # one entry per process (rank 0's is also "grad_paths", which older ffid wrote alone)
            "grad_paths_by_rank": {
                str(rank): dict(sorted(paths.items())) for rank, paths in sorted((grad_paths or {}).items())
            },
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        commit_dir(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_state_meta(folder: Path) -> dict[str, Any]:
    """The ``state.json`` of a state folder, checked for format."""
    path = folder / "state.json"
    recover_dir(folder)  # a save killed mid-switch left it aside, complete
    if not folder.is_dir():
        raise MissingFileError(
            f"resume folder {str(folder)!r} does not exist; give a '*-state' folder "
            "written with save_state = true"
        )
    if not path.is_file():
        raise ModelFileError(
            f"{str(folder)!r} is not an ffid training state (no state.json); "
            "give a '*-state' folder written with save_state = true"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{str(path)!r} is corrupt ({exc}); resume from an earlier state") from None
    if meta.get("format") != STATE_FORMAT:
        raise ModelFileError(
            f"{str(folder)!r} has state format {meta.get('format')!r}, this ffid reads {STATE_FORMAT!r}"
        )
    for name in ("proxies.safetensors", "optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            raise ModelFileError(
                f"state {str(folder)!r} lacks {name}; it is incomplete, resume from another one"
            )
    return meta


def check_identity(folder: Path, meta: dict[str, Any], identity: RunIdentity) -> None:
    """Refuse a state written by a run with another model, selection or training config."""
    if meta["manifest_fingerprint"] != identity.manifest_fingerprint:
        raise MismatchError(
            f"resume state {str(folder)!r} was written for another model (manifest "
            f"{meta['manifest_fingerprint']} != {identity.manifest_fingerprint}); "
            "resume with the model it was trained on or start a new run"
        )
    if meta["selection_fingerprint"] != identity.selection_fingerprint:
        raise MismatchError(
            f"resume state {str(folder)!r} trained another selection (fingerprint "
            f"{meta['selection_fingerprint']} != {identity.selection_fingerprint}); "
            "use the same ff/ffid/selector/include/exclude as that run"
        )
    if meta["config_hash"] != identity.config_hash:
        old = meta.get("trajectory_keys", {})
        diff = [
            k
            for k in sorted(set(old) | set(identity.trajectory_keys))
            if old.get(k) != identity.trajectory_keys.get(k)
        ]
        what = ", ".join(f"{k}: {old.get(k)!r} -> {identity.trajectory_keys.get(k)!r}" for k in diff[:4])
        raise MismatchError(
            f"resume state {str(folder)!r} comes from a run with other settings ({what or 'hash'}); "
            "resume with that run's config or start a new run"
        )
    if meta.get("world_size", 1) != identity.world_size:
        raise MismatchError(
            f"resume state {str(folder)!r} was written by {meta.get('world_size')} processes, "
            f"this run has {identity.world_size}; launch the same number to resume exactly"
        )


def grad_paths_of(meta: dict[str, Any], rank: int) -> dict[str, str]:
    """The gradient paths process ``rank`` took in the saved run (``{}`` for states without them)."""
    by_rank = meta.get("grad_paths_by_rank") or {}
    paths = by_rank.get(str(rank)) if isinstance(by_rank, dict) else None
    return dict(paths if isinstance(paths, dict) else meta.get("grad_paths") or {})


def load_state(folder: Path, rank: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a state folder (after :func:`read_state_meta` and :func:`check_identity`)."""
    from safetensors.torch import load_file

    rng_path = folder / f"rng-{rank}.pt"
    if not rng_path.is_file():
        raise ModelFileError(f"state {str(folder)!r} lacks {rng_path.name}; it is incomplete")
    try:
        proxies = load_file(str(folder / "proxies.safetensors"), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ModelFileError(
            f"state file {str(folder / 'proxies.safetensors')!r} is corrupt or truncated "
            f"({_one_line(exc)}); resume from another state"
        ) from None
    return {
        "proxies": proxies,
        "optimizer": _load_tensors_only(folder / "optimizer.pt", device),
        "scheduler": _load_tensors_only(folder / "scheduler.pt", "cpu"),
        "rng": _load_tensors_only(rng_path, "cpu"),
    }


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _load_tensors_only(path: Path, device: torch.device | str) -> Any:
    """``torch.load`` that can only build tensors and plain containers: a crafted file runs no code.

    ``weights_only=True`` makes torch's unpickler refuse every global outside its allow-list of
    tensor types, so a state from a stranger cannot import or call anything; such a file and a
    truncated one are refused with one line.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it reads anyway
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError (zip), ...
        raise ModelFileError(
            f"state file {str(path)!r} is corrupt, truncated or holds objects other than tensors and "
            f"plain values ({_one_line(exc)}); ffid never runs code from a file: resume from a state "
            "written by ffid"
        ) from None


def latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The state folder with the highest step in ``output_dir`` for ``output_name``."""
    best: tuple[int, Path] | None = None
    recover_dirs(output_dir)  # states a killed save left aside count too
    for folder in output_dir.glob(f"{output_name}*-state"):
        try:
            step = int(json.loads((folder / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return best[1] if best else None


__all__ = [
    "STATE_FORMAT",
    "Position",
    "RunIdentity",
    "check_identity",
    "latest_state",
    "load_state",
    "read_state_meta",
    "rng_state",
    "save_state",
    "set_rng_state",
]
