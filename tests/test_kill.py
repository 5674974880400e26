"""kill -9 at every step of a merge and at seeded points of training saves.

After each kill every output is absent, the old version, or the complete new version, and the
next run finishes and leaves no temp behind. Merges are killed deterministically: the child
counts the write events (each write, copy, fsync, rename, unlink) and SIGKILLs itself at the
k-th, for every k of a sharded merge and of a single-file merge (bounded by MAX_TRIALS, seeded).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from tests.test_checkpoint import StandInHandle, save_state
from tests.tiny_models import tiny_wan

import ffid
from ffid.checkpoint import merge as merge_mod
from ffid.checkpoint import merge_checkpoint, save_delta
from ffid.checkpoint.atomic import TEMP_SUFFIX
from ffid.checkpoint.files import Checkpoint
from ffid.errors import ModelFileError

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="kill tests fork the writer"
)

MAX_TRIALS = 40  # per merge kind; the sharded merge has fewer events than this
_FORK = multiprocessing.get_context("fork")


class _Killer:
    """Wraps the functions a merge writes through; SIGKILLs the process at event ``at`` (or counts)."""

    def __init__(self, at: int | None):
        self.at, self.n = at, 0

    def wrap(self, fn):
        def hooked(*a, **k):
            self.n += 1
            if self.at is not None and self.n == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)

        return hooked


def _install(killer: _Killer, monkeypatch=None) -> None:
    targets = [
        (os, "replace"),
        (os, "fsync"),
        (os, "unlink"),
        (merge_mod, "copy_range"),
        (merge_mod, "write_all"),
    ]
    for mod, name in targets:
        fn = getattr(mod, name)
        if monkeypatch is not None:
            monkeypatch.setattr(mod, name, killer.wrap(fn))
        else:
            setattr(mod, name, killer.wrap(fn))


def _child(at: int, base: str, delta: str, out: str) -> None:
    _install(_Killer(at))
    merge_checkpoint(base, [delta], out)
    os._exit(0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    model = tiny_wan()
    save_state(model, tmp / "base.safetensors")
    model.save_pretrained(tmp / "sharded", max_shard_size="40KB")
    for i in (1, 2):
        save_delta(StandInHandle(model, ffid.plan(model, 0.05, i), seed=i), tmp / f"d{i}.safetensors")
    return tmp


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _count_events(monkeypatch, base: Path, delta: Path, out: Path) -> int:
    killer = _Killer(None)
    with monkeypatch.context() as m:
        _install(killer, m)
        merge_checkpoint(base, [delta], out)
    return killer.n


def _trials(n: int, seed: int) -> list[int]:
    ks = list(range(1, n + 1))
    return ks if n <= MAX_TRIALS else sorted(random.Random(seed).sample(ks, MAX_TRIALS))


def _kill_at(k: int, base: Path, delta: Path, out: Path) -> None:
    proc = _FORK.Process(target=_child, args=(k, str(base), str(delta), str(out)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, f"event {k}: child exited {proc.exitcode}"


def test_kill_during_a_sharded_merge_leaves_old_absent_or_new_set(models, tmp_path, monkeypatch):
    base, old_d, new_d = models / "sharded", models / "d1.safetensors", models / "d2.safetensors"
    new_ref = tmp_path / "new"
    n = _count_events(monkeypatch, base, new_d, new_ref)
    new = _snapshot(new_ref)
    old_ref = tmp_path / "oldref"
    merge_checkpoint(base, [old_d], old_ref)
    old = _snapshot(old_ref)
    index = next(name for name in new if name.endswith(".index.json"))
    for k in _trials(n, 13):
        out = tmp_path / f"out{k}"
        merge_checkpoint(base, [old_d], out)
        _kill_at(k, base, new_d, out)
        got = {name: data for name, data in _snapshot(out).items() if not name.endswith(TEMP_SUFFIX)}
        if index in got:  # readable: all old or all new, never mixed
            assert got in (old, new), f"event {k}: mixed set {sorted(got)}"
            with Checkpoint(out):
                pass
        else:  # no index: the set is refused as a whole
            with pytest.raises(ModelFileError):
                Checkpoint(out)
        merge_checkpoint(base, [new_d], out)  # the next run completes and cleans up
        assert _snapshot(out) == new, f"event {k}"


def test_kill_during_a_single_file_merge_leaves_old_or_new_file(models, tmp_path, monkeypatch):
    base, old_d, new_d = models / "base.safetensors", models / "d1.safetensors", models / "d2.safetensors"
    n = _count_events(monkeypatch, base, new_d, tmp_path / "new.safetensors")
    new = (tmp_path / "new.safetensors").read_bytes()
    merge_checkpoint(base, [old_d], tmp_path / "old.safetensors")
    old = (tmp_path / "old.safetensors").read_bytes()
    for k in _trials(n, 17):
        out = tmp_path / f"out{k}"
        out.mkdir()
        target = out / "m.safetensors"
        target.write_bytes(old)
        _kill_at(k, base, new_d, target)
        assert target.read_bytes() in (old, new), f"event {k}"
        merge_checkpoint(base, [new_d], target)
        assert sorted(p.name for p in out.iterdir()) == ["m.safetensors"], f"event {k}: temps left"


def _train(folder: Path, at: int | None) -> int:
    """Train the tiny task with saves every 2 steps, SIGKILLed at write event ``at``; returns the events."""
    from tests.test_train import TinyTask, cfg_for

    from ffid.train import train

    killer = _Killer(at)
    saved = os.replace, os.fsync
    os.replace, os.fsync = killer.wrap(os.replace), killer.wrap(os.fsync)
    try:
        train(cfg_for(folder, save_state=True, save_every_n_steps=2, max_train_steps=4), task=TinyTask())
    finally:
        os.replace, os.fsync = saved
    return killer.n


def _train_child(folder: str, at: int) -> None:
    torch.set_num_threads(1)
    _train(Path(folder), at)
    os._exit(0)


def _check_training_outputs(out: Path) -> None:
    from safetensors import safe_open

    from ffid.train.state import load_state, read_state_meta

    for p in out.iterdir():
        if p.name.startswith("."):
            continue  # temps, removed by the next save
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - not a dict
                    assert torch.isfinite(f.get_tensor(key).float()).all()
        elif p.name.endswith("-state"):
            read_state_meta(p)
            load_state(p, 0)
        elif p.suffix == ".json":
            json.loads(p.read_text())


@pytest.mark.usefixtures("one_thread")
def test_kill_during_training_saves_leaves_complete_outputs(tmp_path):
    n = _train(tmp_path / "full", None)
    for k in _trials(n, 5)[:: max(1, n // 6)]:
        work = tmp_path / f"k{k}"
        proc = _FORK.Process(target=_train_child, args=(str(work), k))
        proc.start()
        proc.join(120)
        assert proc.exitcode == -signal.SIGKILL, f"event {k}: child exited {proc.exitcode}"
        _check_training_outputs(work / "out")
        # the next run completes and removes the killed run's temps
        _train(work, None)
        assert not [p for p in (work / "out").iterdir() if p.name.startswith(".")], f"event {k}"
        _check_training_outputs(work / "out")
