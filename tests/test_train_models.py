"""``ffid train`` end to end on real architectures: a tiny diffusers Wan DiT on a latent cache,
tiny GPT-2 / Llama causal LMs on JSONL/text with a local tokenizer. Save, resume, merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ffid.cli import main
from ffid.errors import ConfigError, MissingFileError, ModelFileError
from ffid.train.cache import CACHE_FORMAT, LatentCacheDataset
from tiny_models import make_lm_folder, make_wan_folders, tiny_gpt2, tiny_llama, tiny_wan, tiny_wan_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def losses(out: Path, name: str = "run") -> list[float]:
    return json.loads((out / f"{name}-loss.json").read_text())["losses"]


@pytest.fixture(scope="module")
def wan_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_wan_folders(tmp_path_factory.mktemp("wan"))


def wan_toml(tmp: Path, dit: Path, cache: Path, **extra: object) -> Path:
    keys = {
        "model_type": "wan",
        "dit": str(dit),
        "dataset": str(cache),
        "ff": 0.02,
        "ffid": 1,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "max_train_steps": 4,
        "seed": 1,
        "output_dir": str(tmp / "out"),
        "output_name": "run",
        "logging_dir": str(tmp / "logs"),
        **extra,
    }
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    path = tmp / "train.toml"
    path.write_text(text + "\n")
    return path


def test_latent_cache_format(wan_setup: tuple[Path, Path]) -> None:
    from safetensors import safe_open

    _, cache = wan_setup
    ds = LatentCacheDataset(cache)
    assert len(ds) == 4 and ds.captions[2] == "caption 2"
    with safe_open(str(ds.files[0]), framework="pt") as f:
        assert f.metadata()["format"] == CACHE_FORMAT
        assert f.get_tensor("latents").shape == (4, 1, 8, 8)


def write_musubi_cache(
    folder: Path, conditioning: str | None = None, wide: bool = False
) -> dict[str, torch.Tensor]:
    """A cache folder as musubi-tuner's Wan cache scripts write it: an image item and two clips of
    one video that share the video's text cache; returns the tensors by latent file name."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    written = {}
    for name, stem, caption in (
        ("cat_0064x0064_wan.safetensors", "cat", "a cat"),
        ("walk_00000-005_0064x0064_wan.safetensors", "walk", "a walk"),
        ("walk_00005-005_0064x0064_wan.safetensors", "walk", "a walk"),
        *((("wide_0096x0064_wan.safetensors", "wide", "a wide view"),) if wide else ()),
    ):
        width = 12 if name.startswith("wide") else 8
        latents = torch.randn(4, 1, 8, width, generator=g).to(torch.bfloat16)
        tensors = {f"latents_1x8x{width}_bf16": latents}
        if conditioning:
            tensors[conditioning] = torch.zeros(3)
        meta = {"architecture": "wan", "width": "64", "height": "64", "format_version": "1.0.1"}
        save_file(tensors, str(folder / name), metadata=meta)
        written[name] = latents
        te = folder / f"{stem}_wan_te.safetensors"
        if not te.exists():
            text = torch.randn(3 + len(stem), 32, generator=g).to(torch.bfloat16)
            meta = {"architecture": "wan", "caption1": caption, "format_version": "1.0.1"}
            save_file({"varlen_t5_bf16": text}, str(te), metadata=meta)
        written[te.name] = load_tensor(te, "varlen_t5_bf16")
    return written


def load_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def test_musubi_cache_folder_is_read_as_it_is(tmp_path: Path, wan_setup: tuple[Path, Path]) -> None:
    from ffid.train.cache import collate_latents

    written = write_musubi_cache(tmp_path / "musubi")
    ds = LatentCacheDataset(tmp_path / "musubi")
    assert ds.kind == "musubi-tuner" and len(ds) == 3
    assert [it.text_file.name for it in ds.items] == [
        "cat_wan_te.safetensors",
        *["walk_wan_te.safetensors"] * 2,
    ]
    assert ds.captions == ["a cat", "a walk", "a walk"]
    item = ds[1]
    assert torch.equal(item["latents"], written["walk_00000-005_0064x0064_wan.safetensors"])
    assert torch.equal(item["text_embeds"], written["walk_wan_te.safetensors"])
    # padded with zeros to Wan's 512 tokens (or the batch's longest with text_len 0)
    batch = collate_latents([ds[0], ds[1]], 512)
    assert batch["text_embeds"].shape == (2, 512, 32) and batch["latents"].shape == (2, 4, 1, 8, 8)
    assert not batch["text_embeds"][0, 6:].any() and batch["text_embeds"][1, :7].any()
    assert collate_latents([ds[0], ds[1]])["text_embeds"].shape == (2, 7, 32)
    with pytest.raises(ConfigError, match=r"more than task_args\.text_len = 4"):
        collate_latents([ds[0]], 4)

    # and ffid train takes the folder as its dataset
    dit, _ = wan_setup
    out = tmp_path / "run"
    out.mkdir()
    assert (
        main(["train", "--config", str(wan_toml(out, dit, tmp_path / "musubi")), "--max_train_steps", "2"])
        == 0
    )
    assert len(losses(out / "out")) == 2 and all(math.isfinite(x) for x in losses(out / "out"))


def test_rehearsal_datasets_join_the_pool(
    tmp_path: Path, wan_setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Training on top of an earlier concept with its data mixed in: both folders feed the batches."""
    dit, cache = wan_setup
    write_musubi_cache(tmp_path / "earlier")
    out = tmp_path / "run"
    out.mkdir()
    toml = wan_toml(out, dit, cache, rehearsal_datasets=[str(tmp_path / "earlier")], batch_size=7)
    assert main(["train", "--config", str(toml), "--max_train_steps", "1", "--no-progress"]) == 0
    assert "items 7 (3 of them from rehearsal_datasets)" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["train", "--config", str(toml), "--rehearsal_datasets", str(tmp_path / "empty")]) == 2
    assert "empty' holds no training items" in capsys.readouterr().err


def test_buckets_of_several_resolutions_train_with_batches(
    tmp_path: Path, wan_setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A musubi cache with two resolutions and batch_size 2: batches keep to one resolution."""
    dit, _ = wan_setup
    write_musubi_cache(tmp_path / "musubi", wide=True)
    ds = LatentCacheDataset(tmp_path / "musubi")
    assert sorted(set(ds.bucket_keys)) == [(4, 1, 8, 8), (4, 1, 8, 12)]
    out = tmp_path / "run"
    out.mkdir()
    toml = wan_toml(out, dit, tmp_path / "musubi", batch_size=2)
    assert main(["train", "--config", str(toml), "--max_train_steps", "3", "--no-progress"]) == 0
    assert "3 micro-batches/epoch from 2 buckets" in capsys.readouterr().out
    assert len(losses(out / "out")) == 3


def test_musubi_cache_refusals(tmp_path: Path) -> None:
    write_musubi_cache(tmp_path / "i2v", conditioning="clip_bf16")
    with pytest.raises(ConfigError, match="'clip_bf16': an image-to-video or control cache"):
        LatentCacheDataset(tmp_path / "i2v")
    write_musubi_cache(tmp_path / "no_te")
    (tmp_path / "no_te" / "cat_wan_te.safetensors").unlink()
    with pytest.raises(
        MissingFileError, match=r"cat_0064x0064_wan\.safetensors has no text-encoder cache cat_wan_te"
    ):
        LatentCacheDataset(tmp_path / "no_te")
    write_musubi_cache(tmp_path / "odd")
    (tmp_path / "odd" / "stray_wan.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"stray_wan\.safetensors .* is not named like a musubi-tuner"):
        LatentCacheDataset(tmp_path / "odd")


def test_wan_train_save_resume_merge(tmp_path: Path, wan_setup: tuple[Path, Path]) -> None:
    dit, cache = wan_setup
    full = tmp_path / "full"
    full.mkdir()
    assert main(["train", "--config", str(wan_toml(full, dit, cache))]) == 0
    part = tmp_path / "part"
    part.mkdir()
    toml = wan_toml(part, dit, cache, save_every_n_steps=2, save_state=True, save_full=True)
    assert main(["train", "--config", str(toml), "--max_train_steps", "2"]) == 0
    out = part / "out"
    assert (out / "run.safetensors").is_file() and (out / "run-full.safetensors").is_file()
    assert main(["train", "--config", str(toml), "--resume", str(out / "run-step00000002-state")]) == 0
    assert losses(out) == losses(full / "out")
    assert len(losses(out)) == 4
    assert list((part / "logs" / "run").glob("events.out.tfevents.*"))

    # the final delta merges into the saved base folder's weights, giving the trained model
    from safetensors.torch import load_file

    merged = tmp_path / "merged.safetensors"
    base_file = dit / "diffusion_pytorch_model.safetensors"
    assert main(["merge", str(base_file), str(out / "run.safetensors"), "-o", str(merged)]) == 0
    a = load_file(str(merged))
    b = load_file(str(out / "run-full.safetensors"))  # save_precision bf16
    for k in b:
        assert torch.equal(a[k].to(torch.bfloat16), b[k]), k


def test_wan_single_file_in_original_naming(tmp_path: Path, wan_setup: tuple[Path, Path]) -> None:
    from safetensors.torch import save_file

    from ffid.checkpoint.namemap import DIFFUSERS, WAN, map_name
    from ffid.train import TrainConfig
    from ffid.train.wan import WanTask

    model = tiny_wan()
    save_file(
        {map_name(k, DIFFUSERS, WAN): v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "wan.safetensors"),
    )
    cfg = TrainConfig(
        model_path=str(tmp_path / "wan.safetensors"),
        task_args={"num_attention_heads": 2, "rope_max_seq_len": 64},
    )
    loaded = WanTask().build_model(cfg)
    inputs = tiny_wan_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_wan_mixed_precision_checkpointing_and_swap(tmp_path: Path, wan_setup: tuple[Path, Path]) -> None:
    dit, cache = wan_setup
    plain = tmp_path / "a"
    plain.mkdir()
    assert main(["train", "--config", str(wan_toml(plain, dit, cache, max_train_steps=2))]) == 0
    swap = tmp_path / "b"
    swap.mkdir()
    toml = wan_toml(swap, dit, cache, max_train_steps=2, blocks_to_swap=1, gradient_checkpointing=True)
    assert main(["train", "--config", str(toml)]) == 0
    assert losses(swap / "out") == pytest.approx(losses(plain / "out"), rel=1e-5)
    bf = tmp_path / "c"
    bf.mkdir()
    assert (
        main(["train", "--config", str(wan_toml(bf, dit, cache, max_train_steps=2, mixed_precision="bf16"))])
        == 0
    )
    assert losses(bf / "out") == pytest.approx(losses(plain / "out"), rel=0.05)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_causal_lm_train_and_resume(tmp_path: Path, factory) -> None:
    folder = make_lm_folder(tmp_path, factory)
    data = tmp_path / "data.jsonl"
    lines = [{"text": f"The cat number {i} sat on the mat, quietly."} for i in range(12)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    common = [
        "--model_type",
        "causal-lm",
        "--model_path",
        str(folder),
        "--dataset",
        str(data),
        "--ff",
        "0.05",
        "--ffid",
        "2",
        "--seq_len",
        "16",
        "--batch_size",
        "2",
        "--learning_rate",
        "5e-3",
        "--max_train_steps",
        "6",
        "--output_name",
        "run",
        "--logging_dir",
        "none",
    ]
    assert main(["train", *common, "--output_dir", str(tmp_path / "a")]) == 0
    ref = losses(tmp_path / "a")
    assert ref[-1] < ref[0]
    b = tmp_path / "b"
    assert main(["train", *common, "--output_dir", str(b), "--save_every_n_steps", "3", "--save_state"]) == 0
    assert (
        main(["train", *common, "--output_dir", str(b), "--resume", "latest", "--max_train_steps", "6"]) == 0
    )
    assert losses(b) == ref
    # a .txt file works as well
    (tmp_path / "t.txt").write_text("Hello there. " * 40)
    assert (
        main(
            [
                "train",
                *common,
                "--dataset",
                str(tmp_path / "t.txt"),
                "--output_dir",
                str(tmp_path / "c"),
                "--max_train_steps",
                "1",
            ]
        )
        == 0
    )


def test_cache_cli(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"latents": torch.randn(3, 4, 8, 8)}, str(tmp_path / "lat.safetensors"))
    torch.save({"text_embeds": torch.randn(3, 6, 32)}, tmp_path / "txt.pt")
    (tmp_path / "caps.txt").write_text("a\nb\nc\n")
    inputs = ["--latents", str(tmp_path / "lat.safetensors"), "--text_embeds", str(tmp_path / "txt.pt")]
    inputs += ["--captions", str(tmp_path / "caps.txt")]
    assert main(["cache", *inputs, "--output_dir", str(tmp_path / "cache")]) == 0
    ds = LatentCacheDataset(tmp_path / "cache")
    assert len(ds) == 3 and ds[0]["latents"].shape == (4, 1, 8, 8) and ds.captions == ["a", "b", "c"]
    (tmp_path / "caps.txt").write_text("a\n")  # one caption for three items
    assert main(["cache", *inputs, "--output_dir", str(tmp_path / "c2")]) == 2
    assert not (tmp_path / "c2").exists()


def test_cache_replaces_its_own_items_and_keeps_the_rest(tmp_path: Path) -> None:
    """A second `ffid cache` into a folder switches the whole folder: this prefix's old items go
    (a smaller cache leaves none behind), other prefixes and files stay; a link is followed."""
    from ffid.train.cache import write_cache

    def items(n: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((n, 4, 1, 2, 2), value), torch.full((n, 3, 8), value)

    real = tmp_path / "real"
    write_cache(real, *items(4, 1.0))
    write_cache(real, *items(2, 5.0), prefix="other")
    (real / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    write_cache(link, *items(2, 2.0))
    assert link.is_symlink()
    names = sorted(p.name for p in real.iterdir())
    assert names == [
        "item_000000.safetensors",
        "item_000001.safetensors",
        "notes.txt",
        "other_000000.safetensors",
        "other_000001.safetensors",
    ]
    values = {it["name"]: float(it["latents"].flatten()[0]) for it in LatentCacheDataset(link)}
    assert values == {
        "item_000000.safetensors": 2.0,
        "item_000001.safetensors": 2.0,
        "other_000000.safetensors": 5.0,
        "other_000001.safetensors": 5.0,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temp or old folder
    with pytest.raises(ConfigError, match="prefix"):
        write_cache(tmp_path / "new", *items(1, 1.0), prefix="../escape")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # torchrun, 2 processes: ~40 s on 2 cores
def test_two_processes_train_like_one_on_the_combined_batch(tmp_path: Path) -> None:
    """``torchrun -m ffid train`` with 2 CPU processes: one delta, the same curve as one process
    with twice the batch (Llama: no dropout, so the two runs see the same computation)."""
    import os
    import subprocess
    import sys

    from ffid.checkpoint import load_delta

    folder = make_lm_folder(tmp_path, tiny_llama)
    data = tmp_path / "data.jsonl"
    lines = [{"text": f"The cat number {i} sat on the mat, quietly."} for i in range(12)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    common = [
        "--model_type", "causal-lm", "--model_path", str(folder), "--dataset", str(data),
        "--ff", "0.05", "--ffid", "2", "--seq_len", "16", "--learning_rate", "5e-3",
        "--max_train_steps", "4", "--output_name", "run", "--logging_dir", "none", "--no-progress",
    ]  # fmt: skip
    assert main(["train", *common, "--batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "ffid", "train", *common, "--batch_size", "2", "--output_dir", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one start-up summary: the second process is not training on its own
    assert proc.stdout.count("x 2 process(es)") == 1, proc.stdout[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one = load_delta(tmp_path / "one" / "run.safetensors").values()
    two = load_delta(tmp_path / "two" / "run.safetensors").values()
    assert one.keys() == two.keys()
    for name, values in one.items():
        torch.testing.assert_close(two[name], values, rtol=1e-5, atol=1e-6)


def test_wan_preservation_finds_encodings_in_caches(
    tmp_path: Path, wan_setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """character1 on ffid's cache records its captions (and, here, stores no encodings:
    store_encodings = false); character2 on a musubi cache, on top of it, protects them by
    finding their encodings in character1's cache; a prompt with no encoding anywhere is refused
    in one line before anything is written. (From the encodings a delta stores:
    tests/test_stored_encodings.py.)"""
    from ffid.checkpoint.delta import DeltaFile
    from ffid.preserve import recorded_prompts

    dit, cache1 = wan_setup
    one = tmp_path / "one"
    one.mkdir()
    toml1 = wan_toml(one, dit, cache1, max_train_steps=2, store_encodings=False)
    assert main(["train", "--config", str(toml1)]) == 0
    delta1 = one / "out" / "run.safetensors"
    assert recorded_prompts(delta1) == [f"caption {i}" for i in range(4)]
    with DeltaFile(delta1) as df:
        assert df.text is None and df.text_count == 0

    cache2 = tmp_path / "musubi"
    write_musubi_cache(cache2)
    two = tmp_path / "two"
    two.mkdir()
    common = {"ffid": 2, "max_train_steps": 2, "base_deltas": [str(delta1)], "preserve_items": 2}
    # character1's captions are nowhere but in its own cache: refused, naming the prompt
    assert main(["train", "--config", str(wan_toml(two, dit, cache2, **common))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "protected prompt 'caption 0' (from run.safetensors)" in err[0]
    assert "preserve_cache" in err[0]
    assert not (two / "out").exists()
    # given as preserve_cache, they are found; the empty prompt has no encoding: left out, noted
    toml = wan_toml(two, dit, cache2, preserve_cache=[str(cache1)], **common)
    assert main(["train", "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "protecting 4 prompt(s): 'caption 0' (run.safetensors)" in out
    assert "the empty prompt has no text encoding in the caches" in out
    assert recorded_prompts(two / "out" / "run.safetensors") == ["a cat", "a walk"]


def test_wan_preservation_with_checkpointing_swap_accumulation_and_bf16(
    tmp_path: Path, wan_setup: tuple[Path, Path]
) -> None:
    """Preservation keeps working with gradient checkpointing, simulated block swap, gradient
    accumulation and bf16 autocast: the same trained values as the plain configuration."""
    from safetensors.torch import load_file

    dit, cache = wan_setup
    one = tmp_path / "one"
    one.mkdir()
    assert main(["train", "--config", str(wan_toml(one, dit, cache, max_train_steps=2))]) == 0
    common = {
        "ffid": 2,
        "max_train_steps": 3,
        "base_deltas": [str(one / "out" / "run.safetensors")],
        "preserve_items": 2,
        "preserve_empty": False,
        "gradient_accumulation_steps": 2,
        "batch_size": 1,
    }

    def run(name: str, **extra: object) -> dict[str, torch.Tensor]:
        folder = tmp_path / name
        folder.mkdir()
        assert main(["train", "--config", str(wan_toml(folder, dit, cache, **common, **extra))]) == 0
        return load_file(str(folder / "out" / "run.safetensors"))

    plain = run("plain")
    heavy = run("heavy", gradient_checkpointing=True, blocks_to_swap=1)
    assert plain.keys() == heavy.keys()
    for k in plain:
        torch.testing.assert_close(heavy[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    bf16 = run("bf16", mixed_precision="bf16")
    moved = [k for k in plain if k.endswith(".ffid_value") and not torch.equal(bf16[k], plain[k])]
    assert moved  # it trained, in bf16 (values differ by rounding)
    for k in plain:
        assert torch.isfinite(bf16[k].float()).all(), k
