"""ffid as the network module of the real musubi-tuner (v0.3.4, unmodified source), on CPU.

musubi's own ``wan_train_network`` runs in a separate virtual environment (``.venv-musubi``, made
by ``.ci/run``) holding musubi's pinned dependencies, so the versions ffid's other tests run with
stay as they are. ``tests/musubi_real/launch.py`` does only what a CPU-only machine needs (stub
torchvision, a tiny Wan config, a working CPU block-swap function, a pretended FSDP/DeepSpeed
state for the refusals) and writes the caches with musubi's own cache writers.

Every run is declared once in ``scenarios()`` (``tests/musubi_real/scenarios.py``, with how a
run is launched) and run by one module fixture here: the first (``plain``, which also writes the
tiny DiT and the caches) alone, then the others two at a time, each once the run it names in
``after`` is done (``plain`` by default); each test reads the results. Adding a scenario is one
more ``Scenario`` line there (e.g. extra ``network_args``) plus a test reading ``runs["name"]``.

Skips (with the reason) when musubi-tuner's source or the environment is absent, e.g. in a
user's clone; ``.ci/run`` sets ``FFID_REQUIRE_MUSUBI=1`` so that CI fails instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ffid.checkpoint.delta import load_delta
from musubi_real.scenarios import TIMEOUT, Run, _launch, _missing, _run, readme_wan22, scenarios


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    reason = _missing()
    if reason:
        if os.environ.get("FFID_REQUIRE_MUSUBI") == "1":
            pytest.fail(f"FFID_REQUIRE_MUSUBI=1 but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("musubi")
    todo = scenarios(root)
    first = todo[0]
    results = {first.name: _run(root, first, prepare=True)}  # also writes the model and caches
    results[first.name].check()
    waiting = todo[1:]
    while waiting:  # each wave: the runs whose input run is done, two at a time
        wave = [s for s in waiting if s.after in results]
        assert wave, f"scenarios wait on runs that never come: {[s.after for s in waiting]}"
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {s.name: pool.submit(_run, root, s) for s in wave}
            results.update({name: f.result() for name, f in futures.items()})
        waiting = [s for s in waiting if s.name not in results]
    return results


def _equal(a, b) -> list[str]:  # type: ignore[no-untyped-def]
    va, vb = a.values(), b.values()
    assert va.keys() == vb.keys()
    return [n for n in va if not torch.equal(va[n], vb[n])]


def test_trains_saves_every_n_steps_and_resumes_exactly(runs):
    plain, resume = runs["plain"], runs["resume"]
    plain.check()
    for f in ("plain-step00000002.safetensors", "plain-step00000004.safetensors", "plain.safetensors"):
        assert (plain.out / f).is_file(), f
    state = plain.out / "plain-step00000002-state"
    assert (state / "model.safetensors").stat().st_size < 1_000_000  # proxies, not the DiT
    d = plain.delta()
    assert d.info.selection_fingerprint and len(d) > 50  # every kind of tensor is touched
    assert _equal(d, plain.delta("plain-step00000002"))  # it trained
    assert any(".modulation" in n for n in d.tensors) and any("norm" in n for n in d.tensors)
    assert "network weights will be saved as torch.float32" in plain.log  # musubi's default
    resume.check()
    assert "resume training from local state" in resume.log
    assert _equal(resume.delta(), d) == []


def test_gradient_checkpointing_and_block_swap_give_identical_values(runs):
    run = runs["ckpt_swap"]
    run.check()
    assert "Gradient checkpointing enabled" in run.log and "Block swap enabled" in run.log
    swaps = int(re.search(r"FFID_TEST_SWAPS=(\d+)", run.log).group(1))  # type: ignore[union-attr]
    assert swaps > 0
    assert _equal(run.delta(), runs["plain"].delta()) == []


def test_network_weights_bf16_adamw8bit_and_scale_weight_norms(runs):
    run = runs["continue"]
    run.check()
    assert "use 8-bit AdamW optimizer" in run.log
    start = runs["plain"].delta()
    assert f"ffid: {start.selected:,} trained values" in run.log  # --network_weights loaded
    d = run.delta()
    assert d.info.selection_fingerprint == start.info.selection_fingerprint
    assert _equal(d, start)  # trained on
    base = load_file(run.out.parent / "dit.safetensors")
    values = d.values()
    for n, t in d.tensors.items():
        update = values[n] - base[n].reshape(-1)[t.indices].float()
        assert torch.isfinite(update).all(), n
        assert float(update.norm()) <= 0.05 * (1 + 1e-5), n  # --scale_weight_norms 0.05


def _merge_and_diff(
    root: Path, deltas: list[Path], tmp_path: Path, base: str = "dit.safetensors"
) -> tuple[dict, dict]:
    """``ffid merge`` the deltas into the tiny DiT ``base``; load both files with musubi's own Wan
    loader. Returns (per tensor: the flat positions that differ, the merged file's tensors)."""
    merged = tmp_path / f"merged-{base}"
    cmd = [sys.executable, "-m", "ffid", "merge", str(root / base), *map(str, deltas)]
    subprocess.run([*cmd, "-o", str(merged), "-q"], check=True, timeout=TIMEOUT)
    changed_file = tmp_path / f"changed-{base}"
    argv = ["diff", str(root / base), str(merged), str(changed_file)]
    code, log = _launch(argv, tmp_path / f"diff-{base}.log")
    assert code == 0, log[-4000:]
    return load_file(changed_file), load_file(merged)


def _check_merged(runs, run: Run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Character 1 and ``run`` (character 2 on top) merged: the file differs from the base exactly
    at the deltas' positions, and holds their values there (the tiny DiT is fp32: exact)."""
    first, second = runs["plain"].delta(), run.delta()
    for n in set(first.tensors) & set(second.tensors):
        overlap = set(first.tensors[n].indices.tolist()) & set(second.tensors[n].indices.tolist())
        assert not overlap, n  # ids never touch the same weight
    paths = [runs["plain"].out / "plain.safetensors", run.out / f"{run.scenario.name}.safetensors"]
    changed, merged_sd = _merge_and_diff(run.out.parent, paths, tmp_path)
    want: dict[str, list[torch.Tensor]] = {}
    for d in (first, second):
        for n, t in d.tensors.items():
            want.setdefault(n, []).append(t.indices)
    assert changed.keys() == want.keys()
    for n, parts in want.items():
        assert torch.equal(changed[n], torch.cat(parts).sort().values), n  # exactly the deltas' positions
    for d in (first, second):
        for n, v in d.values().items():
            assert torch.equal(merged_sd[n].reshape(-1)[d.tensors[n].indices], v), n


def test_second_id_on_top_merged_and_loaded_by_musubi(runs, tmp_path):
    run = runs["on_top"]
    run.check()
    assert "merged" in run.log and "all weights merged" in run.log  # --base_weights went through ffid
    _check_merged(runs, run, tmp_path)


def test_fp8_scaled_with_block_swap_merges_exactly_into_the_file(runs, tmp_path):
    """--fp8_scaled: trained through musubi's scaled-fp8 Linears, under block swap; the trained
    elements start from the file's values, so ``ffid merge`` (which checks the delta's base
    fingerprint against the file) accepts it and the merged file holds its values exactly."""
    run = runs["fp8_scaled"]
    run.check()
    assert "Number of monkey-patched Linear layers" in run.log  # musubi's scaled fp8 is on
    m = re.search(r"ffid: fp8 DiT: (\d+) trained tensors start from", run.log)
    assert m and int(m.group(1)) > 10, run.log[-3000:]
    assert "scaled-fp8 Linear" in run.log and "Block swap enabled" in run.log
    assert int(re.search(r"FFID_TEST_SWAPS=(\d+)", run.log).group(1)) > 0  # type: ignore[union-attr]
    d = run.delta()
    base = load_file(run.out.parent / "dit.safetensors")
    moved = [
        n for n, v in d.values().items() if not torch.equal(v, base[n].reshape(-1)[d.tensors[n].indices])
    ]
    assert any(".self_attn." in n or ".ffn." in n for n in moved)  # scaled weights trained
    _check_merged(runs, run, tmp_path)


def test_both_experts_one_run_one_delta_each(runs, tmp_path):
    """--dit_high_noise: each expert trains its own values at the same positions; each delta
    merges into its own expert's file only (ffid merge refuses the other one, naming the expert)."""
    run = runs["experts"]
    run.check()
    assert "ffid: both Wan 2.2 experts" in run.log
    assert "switched the DiT to the high_noise expert" in run.log  # musubi used both experts
    root = run.out.parent
    low, high = run.delta(), run.delta("experts_high_noise")
    assert low.metadata["ffid.expert"] == "low_noise" and high.metadata["ffid.expert"] == "high_noise"
    assert low.metadata["ffid.expert_pair"].split()[0] == high.metadata["ffid.expert_pair"].split()[0]
    assert low.info.selection_fingerprint == high.info.selection_fingerprint
    for n in low.tensors:
        assert torch.equal(low.tensors[n].indices, high.tensors[n].indices), n  # same positions
    for d, file in ((low, "dit.safetensors"), (high, "dit_high.safetensors")):
        base = load_file(root / file)
        moved = [
            n for n, v in d.values().items() if not torch.equal(v, base[n].reshape(-1)[d.tensors[n].indices])
        ]
        assert moved, f"the {d.metadata['ffid.expert']} expert was not trained"
        # loaded back by musubi's own loader: differs from the expert's file at exactly the positions
        changed, got = _merge_and_diff(root, [d.path], tmp_path, base=file)
        assert changed.keys() == d.tensors.keys()
        for n, v in d.values().items():
            assert torch.equal(changed[n], d.tensors[n].indices), n
            assert torch.equal(got[n].reshape(-1)[d.tensors[n].indices], v), n
    wrong = [sys.executable, "-m", "ffid", "merge", str(root / "dit.safetensors"), str(high.path)]
    proc = subprocess.run([*wrong, "-o", str(tmp_path / "wrong.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2 and "high_noise expert" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "wrong.safetensors").exists()
    shown = subprocess.run(
        [sys.executable, "-m", "ffid", "inspect", str(high.path)], capture_output=True, text=True
    )
    assert "expert=high_noise (Wan 2.2)" in shown.stdout, shown.stdout + shown.stderr
    more = runs["experts_more"]
    more.check()
    assert "high-noise expert from experts_high_noise.safetensors" in more.log
    assert "switched the DiT to the high_noise expert" in more.log
    assert _equal(more.delta("experts_more_high_noise"), high)  # continued from it and trained on


def test_both_experts_on_top_of_both_experts(runs, tmp_path):
    """Character 2 (id 2) with both experts on top of the two-expert character 1: each expert's file
    takes both characters' deltas of that expert, checked against its own base fingerprints."""
    run = runs["experts_on_top"]
    run.check()
    assert "merged experts_high_noise.safetensors into the high-noise expert" in run.log
    root = run.out.parent
    first = runs["experts"].out
    for file, twin in (("dit.safetensors", ""), ("dit_high.safetensors", "_high_noise")):
        deltas = [first / f"experts{twin}.safetensors", run.out / f"experts_on_top{twin}.safetensors"]
        merged = tmp_path / f"both-{file}"
        cmd = [
            sys.executable,
            "-m",
            "ffid",
            "merge",
            str(root / file),
            *map(str, deltas),
            "-o",
            str(merged),
            "-q",
        ]
        subprocess.run(cmd, check=True, timeout=TIMEOUT)  # verifies every delta against this file
        got = load_file(merged)
        for path in deltas:
            d = load_delta(path)
            for n, v in d.values().items():
                assert torch.equal(got[n].reshape(-1)[d.tensors[n].indices], v), (path.name, n)


def test_readme_wan22_commands_run(runs, tmp_path):
    """The README's Wan 2.2 A14B block (both experts, --fp8_scaled, block swap, AdamW8bit, two
    characters), run by the real musubi on the tiny config, then its two ``ffid merge`` lines."""
    for name in ("readme1", "readme2"):
        run = runs[name]
        run.check()
        assert "ffid: fp8 DiT:" in run.log and "ffid: both Wan 2.2 experts" in run.log
        assert "switched the DiT to the high_noise expert" in run.log
    assert "into the high-noise expert" in runs["readme2"].log
    _, merges = readme_wan22(runs["plain"].out.parent)
    assert len(merges) == 2
    for words in merges:
        words = [str(tmp_path / Path(w).name) if w.startswith("/ComfyUI/") else w for w in words]
        subprocess.run([sys.executable, "-m", "ffid", "merge", *words, "-q"], check=True, timeout=TIMEOUT)
        got = load_file(words[words.index("-o") + 1])
        for path in words[1 : words.index("-o")]:
            d = load_delta(path)
            assert d.metadata["ffid.expert"] == ("high_noise" if "_high_noise" in path else "low_noise")
            for n, v in d.values().items():
                assert torch.equal(got[n].reshape(-1)[d.tensors[n].indices], v), (path, n)


def test_projection_with_both_experts(runs):
    """Projection protects through the right expert: one feature pass per expert, when musubi
    first trains it, at times in that expert's range (boundary 0.5 here), each expert's values
    projected with its own bases."""
    run = runs["experts_proj"]
    run.check()
    assert "ffid feature pass done (low_noise expert, times 0-0.5)" in run.log, run.log[-3000:]
    assert "ffid feature pass done (high_noise expert, times 0.5-1)" in run.log
    assert "merged experts_high_noise.safetensors into the high-noise expert" in run.log
    low, high = run.delta(), run.delta("experts_proj_high_noise")
    assert low.info.selector == high.info.selector == "rows"
    root = run.out.parent
    for d, file in ((low, "dit.safetensors"), (high, "dit_high.safetensors")):
        base = load_file(root / file)
        values = d.values()
        assert any(not torch.equal(v, base[n].reshape(-1)[d.tensors[n].indices]) for n, v in values.items())


def test_preservation_runs_inside_musubi(runs):
    """Preservation reaches the proxies through musubi's own backward: same data, seed and id as
    ``on_top``, different trained values; still disjoint from character 1."""
    run, on_top = runs["preserve"], runs["on_top"]
    run.check()
    assert "ffid preservation: weight 10.0" in run.log and "'a photo of alice'" in run.log
    assert re.search(r"ffid preservation: distance [0-9.e+-]+ \(a photo of", run.log), run.log[-3000:]
    d = run.delta()
    assert d.info.selection_fingerprint == on_top.delta().info.selection_fingerprint
    assert _equal(d, on_top.delta())  # the preservation gradient changed what was trained
    first = runs["plain"].delta()
    for n in set(first.tensors) & set(d.tensors):
        assert not set(first.tensors[n].indices.tolist()) & set(d.tensors[n].indices.tolist()), n


def test_refusals_fire_through_musubi(runs):
    run = runs["refusals"]
    run.check()
    results = dict(re.findall(r"FFID_TEST_RESULT\[(\d)\]=(.*)", run.log))
    assert len(results) == 5, run.log[-4000:]
    high, _swap, one_expert, fsdp, deepspeed = (results[str(i)] for i in range(5))
    assert one_expert.startswith("ConfigError") and "holds one expert's values" in one_expert
    assert high.startswith("ConfigError") and "preservation loss with both Wan 2.2" in high
    assert fsdp.startswith("ConfigError") and "FSDP" in fsdp
    assert deepspeed.startswith("ConfigError") and "DeepSpeed" in deepspeed
    assert not (run.out).exists()  # nothing trained or saved


def test_projection_under_block_swap_with_accumulation(runs):
    """character 2 protected by projection with the seed's flags (bf16 autocast, in-block
    checkpointing, accumulation 2; fp8: see PROJ_FLAGS in musubi_real/scenarios.py): block swap
    changes no bit.

    What differs from a GPU run: musubi's offloader moves weights with a CPU copy instead of its
    CUDA stream exchange (launch.py ``--cpu-swap``); the calls, their order and the forward-only /
    training switching around the feature pass are musubi's own code.
    """
    acc, swap = runs["proj_acc"], runs["proj_swap"]
    for run in (acc, swap):
        run.check()
        assert "ffid feature pass done" in run.log and "trained rows have no free direction" in run.log
    assert "Block swap enabled" in swap.log and "Block swap set to forward only" in swap.log
    assert int(re.search(r"FFID_TEST_SWAPS=(\d+)", swap.log).group(1)) > 0  # type: ignore[union-attr]
    d = acc.delta()
    assert d.info.selector == "rows"
    assert not _equal(d, swap.delta()), "block swap changed trained values"


def test_projection_from_the_encodings_the_delta_stores(runs):
    """Character 1's delta records its captions and stores their text encodings (found through
    --dataset_config), both experts' deltas the same ones; character 2 protected with
    --base_weights and no preserve_cache trains exactly what it trains from the cache."""
    from ffid.checkpoint.delta import DeltaFile

    plain = runs["plain"]
    assert "ffid: the deltas record 2 caption(s) and store the text encodings of 2" in plain.log
    with DeltaFile(plain.out / "plain.safetensors") as df:
        assert df.text_prompts == ["a photo of alice", "a photo of bob"]
        assert df.text_width == 4096 and df.text.dtypes == ("BF16",) and df.text.nbytes == 122_880
        stored = df.text_encodings()
    cache = plain.out.parent / "cache"
    for name, prompt in (("alice", "a photo of alice"), ("bob", "a photo of bob")):
        te = load_file(cache / f"{name}_wan_te.safetensors")
        assert torch.equal(stored[prompt], next(iter(te.values()))), name  # bit for bit, as cached
    experts = runs["experts"].out
    low, high = (DeltaFile(experts / f"experts{s}.safetensors") for s in ("", "_high_noise"))
    with low, high:
        assert low.text_prompts == high.text_prompts == list(stored)
        for prompt, t in low.text_encodings().items():
            assert torch.equal(high.read_text(prompt), t) and torch.equal(stored[prompt], t), prompt
    run = runs["proj_stored"]
    run.check()
    assert "2 prompt(s) from the text encodings stored in plain.safetensors, 0 from preserve_cache" in run.log
    assert "ffid feature pass done" in run.log
    assert _equal(run.delta(), runs["proj_acc"].delta()) == [], "stored encodings protect differently"


def test_projection_resume_repeats_the_uninterrupted_run(runs):
    """Steps 3-4 from the step-2 state repeat the 4-step run bit for bit: the bases are rebuilt
    from the latent shape the state recorded.

    Without accumulation: with ``--gradient_accumulation_steps 2`` musubi 0.3.4's own resume is
    not exact, with or without ffid's protection (measured: a plain ``selector=rows`` run resumed
    at step 2 differs in 36 of 72 stored tensors).
    """
    proj, resumed = runs["proj"], runs["proj_resume"]
    proj.check()
    resumed.check()
    assert "resume training from local state" in resumed.log and "ffid feature pass done" in resumed.log
    assert not _equal(proj.delta(), resumed.delta()), "the resumed run differs from the uninterrupted one"


def test_loss_method_under_block_swap_names_projection(runs):
    run = runs["refusals"]
    result = dict(re.findall(r"FFID_TEST_RESULT\[(\d)\]=(.*)", run.log))["1"]
    assert result.startswith("ConfigError") and "preserve_method=projection" in result
