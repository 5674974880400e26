"""kill -9 at every point of a merge, of a state save and of a training run's saves.

After each kill every output is readable as the old version or the complete new one (a sharded
set included: never without its index), a state folder is never lost, and the next run finishes
and leaves no temp or stray shard behind. Kills are deterministic: the child counts the
filesystem events (each write, copy, fsync, link, rename, unlink, mkdir, rmdir) and SIGKILLs
itself at the k-th, for every k; the run one past the last event must finish, which proves the
count covered every event.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from tests.test_checkpoint import StandInHandle, save_state
from tests.tiny_models import tiny_wan

import ffid
from ffid.checkpoint import merge as merge_mod
from ffid.checkpoint import merge_checkpoint, save_delta
from ffid.checkpoint.files import Checkpoint

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="kill tests fork the writer"
)

_FORK = multiprocessing.get_context("fork")
# Every call that changes what is on disk; shutil.rmtree and tempfile go through these too.
_OS_EVENTS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir", "fsync")


class _Killer:
    """Wraps the functions writers go through; SIGKILLs the process at event ``at`` (or counts)."""

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
    targets = [(os, name) for name in _OS_EVENTS] + [(merge_mod, "copy_range"), (merge_mod, "write_all")]
    for mod, name in targets:
        fn = getattr(mod, name)
        if monkeypatch is not None:
            monkeypatch.setattr(mod, name, killer.wrap(fn))
        else:
            setattr(mod, name, killer.wrap(fn))


def _run_killed(at: int, fn, *args) -> int | None:
    """Run ``fn(*args)`` in a forked child killed at event ``at``; its exit code (None: hung)."""

    def child() -> None:
        torch.set_num_threads(1)
        _install(_Killer(at))
        fn(*args)
        os._exit(0)

    proc = _FORK.Process(target=child)
    proc.start()
    proc.join(120)
    return proc.exitcode


@pytest.fixture(autouse=True)
def _no_sync(monkeypatch):
    """fsync guards against power loss, not kill -9 (the page cache survives); it stays an event."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


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


def _set_content(folder: Path) -> str:
    """What a reader of the set sees: the index minus shard names, and tensor -> its shard's hash."""
    with Checkpoint(folder) as ck:
        index = dict(ck.index or {})
        shards = {sf.path.name: hashlib.sha256(sf.path.read_bytes()).hexdigest() for sf in ck.shards}
        weight_map = index.pop("weight_map")
        return json.dumps([index, {k: shards[v] for k, v in weight_map.items()}], sort_keys=True)


def _count(monkeypatch, fn, *args) -> int:
    killer = _Killer(None)
    with monkeypatch.context() as m:
        _install(killer, m)
        fn(*args)
    return killer.n


def test_kill_during_a_sharded_merge_leaves_the_old_or_the_new_set(models, tmp_path, monkeypatch):
    base, old_d, new_d = models / "sharded", models / "d1.safetensors", models / "d2.safetensors"
    new_ref, old_ref = tmp_path / "new", tmp_path / "oldref"
    merge_checkpoint(base, [new_d], new_ref)
    merge_checkpoint(base, [old_d], old_ref)
    new, old = _snapshot(new_ref), _snapshot(old_ref)
    readable = {_set_content(old_ref), _set_content(new_ref)}
    # Count the events of the case under test: the new set replacing an old one.
    counted = tmp_path / "counted"
    merge_checkpoint(base, [old_d], counted)
    n = _count(monkeypatch, merge_checkpoint, base, [new_d], counted)
    assert _snapshot(counted) == new  # a complete switch ends with the plain shard names

    def check(k: int) -> None:
        out = tmp_path / f"out{k}"
        assert _set_content(out) in readable, f"event {k}: the set reads as neither old nor new"
        merge_checkpoint(base, [new_d], out)  # the next run completes and cleans up
        assert _snapshot(out) == new, f"event {k}: {sorted(_snapshot(out))}"

    def run(k: int) -> None:
        out = tmp_path / f"out{k}"
        merge_checkpoint(base, [old_d], out)
        assert _snapshot(out) == old
        code = _run_killed(k, merge_checkpoint, base, [new_d], out)
        assert code == (0 if k == n + 1 else -signal.SIGKILL), f"event {k} of {n}: child exited {code}"
        check(k)

    for k in range(1, n + 2):
        run(k)


def test_a_sharded_merge_without_hard_links_keeps_variant_names(models, tmp_path, monkeypatch):
    """Where the filesystem has no hard links the new set stays under its variant names, readable."""
    base, old_d, new_d = models / "sharded", models / "d1.safetensors", models / "d2.safetensors"
    merge_checkpoint(base, [new_d], tmp_path / "new")
    want = _set_content(tmp_path / "new")
    out = tmp_path / "out"
    merge_checkpoint(base, [old_d], out)

    def no_link(*a, **k):
        raise OSError(1, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(os, "link", no_link)
        merge_checkpoint(base, [new_d], out)
    assert _set_content(out) == want
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert len(names) == len(_snapshot(tmp_path / "new"))  # old shards gone, one file per shard
    merge_checkpoint(base, [old_d], out)  # and the next merge goes back to the plain names
    assert sorted(_snapshot(out)) == sorted(_snapshot(tmp_path / "new"))


def test_kill_during_a_single_file_merge_leaves_old_or_new_file(models, tmp_path, monkeypatch):
    base, old_d, new_d = models / "base.safetensors", models / "d1.safetensors", models / "d2.safetensors"
    merge_checkpoint(base, [old_d], tmp_path / "old.safetensors")
    old = (tmp_path / "old.safetensors").read_bytes()
    counted = tmp_path / "counted.safetensors"
    counted.write_bytes(old)
    n = _count(monkeypatch, merge_checkpoint, base, [new_d], counted)
    new = counted.read_bytes()
    for k in range(1, n + 2):
        out = tmp_path / f"out{k}"
        out.mkdir()
        target = out / "m.safetensors"
        target.write_bytes(old)
        code = _run_killed(k, merge_checkpoint, base, [new_d], target)
        assert code == (0 if k == n + 1 else -signal.SIGKILL), f"event {k} of {n}: child exited {code}"
        assert target.read_bytes() in (old, new), f"event {k}"
        merge_checkpoint(base, [new_d], target)
        assert sorted(p.name for p in out.iterdir()) == ["m.safetensors"], f"event {k}: temps left"


def _save(folder: Path, loss: float) -> None:
    """A small state save; ``loss`` tells the versions apart."""
    from ffid.train.state import Position, RunIdentity, save_state

    w = torch.nn.Parameter(torch.full((4,), loss))
    opt = torch.optim.AdamW([w])
    w.grad = torch.ones(4)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_state(
        folder,
        identity=RunIdentity("c", "s", "m"),
        position=Position(step=2),
        proxies={"w": w.detach()},
        optimizer=opt,
        scheduler=sched,
        rng={0: {"torch": torch.get_rng_state()}},
        losses=[loss],
    )


def _state_loss(folder: Path) -> float:
    from ffid.train.state import load_state, read_state_meta

    meta = read_state_meta(folder)  # puts back a state a killed save left aside
    load_state(folder, 0)
    return meta["losses"][0]


def test_kill_during_a_state_save_never_loses_the_state(tmp_path, monkeypatch):
    counted = tmp_path / "counted" / "run-step00000002-state"
    _save(counted, 1.0)
    n = _count(monkeypatch, _save, counted, 2.0)
    for k in range(1, n + 2):
        folder = tmp_path / f"k{k}" / "run-step00000002-state"
        _save(folder, 1.0)
        code = _run_killed(k, _save, folder, 2.0)
        assert code == (0 if k == n + 1 else -signal.SIGKILL), f"event {k} of {n}: child exited {code}"
        assert _state_loss(folder) in (1.0, 2.0), f"event {k}"
        _save(folder, 3.0)  # the next save completes and leaves no temp or old folder
        assert _state_loss(folder) == 3.0
        assert [p.name for p in folder.parent.iterdir()] == [folder.name], f"event {k}"


def test_the_next_save_restores_a_state_left_aside(tmp_path, monkeypatch):
    """Killed between its two renames, a save leaves the state only as ``.old``: the next save of
    that folder, and a resume, put it back instead of deleting it."""
    from ffid.train.state import latest_state

    folder = tmp_path / "run-step00000002-state"
    _save(folder, 1.0)
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the finished temp is about to go into place
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    real = os.replace

    def killed_save() -> None:
        monkeypatch.setattr(os, "replace", replace_then_die)
        _save(folder, 2.0)

    assert _run_killed(10**9, killed_save) == -signal.SIGKILL
    assert not folder.exists()  # the window this test is about
    aside = tmp_path / "aside"
    shutil.copytree(tmp_path, aside)

    def failing_save(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # the next save fails after taking its temp folder
        m.setattr(torch, "save", failing_save)
        with pytest.raises(OSError):
            _save(folder, 3.0)
    assert _state_loss(folder) == 1.0
    assert latest_state(aside, "run") == aside / folder.name  # a resume finds it too
    assert _state_loss(aside / folder.name) == 1.0


def _plot(losses: list[float], path: Path, title: str) -> Path:
    """The loss plot's atomic write without matplotlib's drawing (most of a tiny run's time)."""
    from ffid.train.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(losses).encode())
    return path


def _train(folder: Path) -> None:
    """Train the tiny task with saves (deltas, states, config, losses) every 2 of 4 steps."""
    from tests.test_train import TinyTask, cfg_for

    from ffid.train import train

    train(cfg_for(folder, save_state=True, save_every_n_steps=2, max_train_steps=4), task=TinyTask())


def _outputs(out: Path) -> dict[str, object]:
    """Every output a reader sees (states put back first), checked complete; name -> its losses or bytes."""
    from safetensors import safe_open

    from ffid.train.state import latest_state, load_state, read_state_meta

    latest_state(out, "run")
    got: dict[str, object] = {}
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue  # temps, removed by the next save
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
            assert all(torch.isfinite(t.float()).all() for t in tensors.values())
            got[p.name] = {key: t.tolist() for key, t in tensors.items()}  # metadata may hold times
        elif p.name.endswith("-state"):
            got[p.name] = read_state_meta(p)["losses"]
            load_state(p, 0)
        elif p.suffix == ".json":
            json.loads(p.read_text())
    return got


@pytest.mark.usefixtures("one_thread")
def test_kill_during_training_saves_leaves_complete_outputs(tmp_path, monkeypatch):
    from ffid.train import trainer

    monkeypatch.setattr(trainer, "plot_losses", _plot)  # forked children inherit it
    first = tmp_path / "first"
    _train(first)
    done = _outputs(first / "out")
    counted = tmp_path / "counted"
    shutil.copytree(first, counted)
    n = _count(monkeypatch, _train, counted)
    for k in range(1, n + 2):
        work = tmp_path / f"k{k}"
        shutil.copytree(first, work)  # the killed run replaces an earlier run's outputs
        code = _run_killed(k, _train, work)
        assert code == (0 if k == n + 1 else -signal.SIGKILL), f"event {k} of {n}: child exited {code}"
        # Same config and seed, so old and new outputs are equal: nothing may be missing or torn.
        assert _outputs(work / "out") == done, f"event {k}"
        _train(work)  # the next run completes and removes the killed run's temps
        assert not [p for p in (work / "out").iterdir() if p.name.startswith(".")], f"event {k}"
        assert _outputs(work / "out") == done
        shutil.rmtree(work)


def _cache(folder: Path, value: float, items: int = 3) -> None:
    """``ffid cache`` itself, from input files; ``value`` tells the versions apart."""
    from ffid.cli import main

    inputs = folder.parent / f"in-{value}-{items}"
    inputs.mkdir(exist_ok=True)
    torch.save(torch.full((items, 4, 1, 2, 2), value), inputs / "lat.pt")
    torch.save(torch.full((items, 5, 8), value), inputs / "txt.pt")
    argv = ["cache", "--latents", str(inputs / "lat.pt"), "--text_embeds", str(inputs / "txt.pt")]
    assert main([*argv, "--output_dir", str(folder)]) == 0


def _cache_content(folder: Path) -> list[tuple[str, float]]:
    from ffid.train.cache import LatentCacheDataset

    ds = LatentCacheDataset(folder)  # puts back a cache a killed switch left aside
    return [(ds[i]["name"], float(ds[i]["latents"].flatten()[0])) for i in range(len(ds))]


def _items(value: float, n: int) -> list[tuple[str, float]]:
    return [(f"item_{i:06d}.safetensors", value) for i in range(n)]


def test_kill_during_ffid_cache_leaves_the_old_or_the_new_cache(tmp_path, monkeypatch):
    """Killed at any point, `ffid cache` leaves the old cache (4 items) or the new one (3 items),
    never a mix or a partial one; the next run finishes and leaves no temp or old folder."""
    counted = tmp_path / "counted" / "cache"
    counted.parent.mkdir()
    _cache(counted, 1.0, 4)
    (counted / "notes.txt").write_text("kept")  # a file of the user's: carried into the new folder
    n = _count(monkeypatch, _cache, counted, 2.0)
    for k in range(1, n + 2):
        folder = tmp_path / f"k{k}" / "cache"
        folder.parent.mkdir()
        _cache(folder, 1.0, 4)
        (folder / "notes.txt").write_text("kept")
        code = _run_killed(k, _cache, folder, 2.0)
        assert code == (0 if k == n + 1 else -signal.SIGKILL), f"event {k} of {n}: child exited {code}"
        assert _cache_content(folder) in (_items(1.0, 4), _items(2.0, 3)), f"event {k}"
        assert (folder / "notes.txt").read_text() == "kept", f"event {k}"
        _cache(folder, 3.0)
        assert _cache_content(folder) == _items(3.0, 3)
        left = sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith("in-"))
        assert left == ["cache"], f"event {k}: {left}"


def test_kill_during_a_first_ffid_cache_leaves_no_folder_or_the_whole_cache(tmp_path, monkeypatch):
    counted = tmp_path / "counted" / "cache"
    counted.parent.mkdir()
    n = _count(monkeypatch, _cache, counted, 2.0)
    for k in range(1, n + 2):
        folder = tmp_path / f"k{k}" / "cache"
        folder.parent.mkdir()
        code = _run_killed(k, _cache, folder, 2.0)
        assert code == (0 if k == n + 1 else -signal.SIGKILL), f"event {k} of {n}: child exited {code}"
        assert not folder.exists() or _cache_content(folder) == _items(2.0, 3), f"event {k}"
