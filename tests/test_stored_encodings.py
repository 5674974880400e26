"""Protection from the text encodings a delta carries (``ffid.text.*``), with the earlier
character's cache deleted: ``ffid train`` (the tiny Wan of tests/test_train_models.py) and the
musubi network module (the fast stand-in, tests/musubi_harness.py; the real musubi-tuner:
tests/test_musubi_real.py, scenario ``proj_stored``)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ffid.checkpoint.delta import KEY_PROMPTS, KEY_TEXT_PROMPTS, DeltaFile, load_delta
from ffid.cli import main
from ffid.errors import ConfigError, ModelFileError
from ffid.train.cache import LatentCacheDataset, read_text_encodings
from musubi_harness import default_args, run_training, tiny_wan_original
from test_integrations_musubi import _te_cache
from test_train_models import wan_toml, write_musubi_cache
from tiny_models import make_wan_folders

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [f"caption {i}" for i in range(4)]  # make_wan_folders' captions, text width 32


def _values(path: Path) -> dict[str, torch.Tensor]:
    return load_delta(path).values()


def _same(a: Path, b: Path) -> None:
    va, vb = _values(a), _values(b)
    assert va.keys() == vb.keys()
    for n in va:
        assert torch.equal(va[n], vb[n]), n


def _retext(src: Path, dst: Path, keep: int | None = None, width: int | None = None) -> Path:
    """``src`` with its stored encodings cut to the first ``keep`` or widened to ``width`` (the
    tensors rewritten as another writer could have, the rest of the file unchanged)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    data = load_file(src)
    prompts = json.loads(meta[KEY_TEXT_PROMPTS])
    for i in range(len(prompts)):
        key = f"ffid.text.{i}"
        if keep is not None and i >= keep:
            del data[key]
        elif width is not None:
            data[key] = torch.zeros(data[key].shape[0], width, dtype=data[key].dtype)
    meta[KEY_TEXT_PROMPTS] = json.dumps(prompts[:keep] if keep is not None else prompts)
    save_file(data, str(dst), metadata=meta)
    return dst


# -- ffid train (wan) ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Character 1 trained twice on its cache (storing its encodings, and not), a copy of that
    cache, then the cache itself deleted; character 2's musubi cache."""
    root = tmp_path_factory.mktemp("stored")
    dit, cache1 = make_wan_folders(root)
    shutil.copytree(cache1, root / "cache1-copy")
    out = {"root": root, "dit": dit, "copy": root / "cache1-copy"}
    for name, store in (("stored", True), ("bare", False)):
        folder = root / name
        folder.mkdir()
        toml = wan_toml(folder, dit, cache1, max_train_steps=2, store_encodings=store)
        assert main(["train", "--config", str(toml)]) == 0
        out[name] = folder / "out" / "run.safetensors"
    shutil.rmtree(cache1)  # character 1's cache is gone
    write_musubi_cache(root / "musubi")
    out["cache2"] = root / "musubi"
    return out


def _char2(wan: dict[str, Path], name: str, **extra: object) -> tuple[int, Path]:
    folder = wan["root"] / name
    folder.mkdir()
    keys = {"ffid": 2, "max_train_steps": 2, "preserve_items": 2, **extra}
    return main(["train", "--config", str(wan_toml(folder, wan["dit"], wan["cache2"], **keys))]), folder


def test_a_wan_delta_stores_its_captions_encodings(wan: dict[str, Path]) -> None:
    kept = read_text_encodings(LatentCacheDataset(wan["copy"]).text_sources())
    with DeltaFile(wan["stored"]) as df:
        assert df.text_prompts == CAPTIONS and df.text_width == 32
        got = df.text_encodings()
    for caption in CAPTIONS:  # bit for bit, in the cache's own dtype (fp32 here)
        assert got[caption].dtype == kept[caption].dtype and torch.equal(got[caption], kept[caption])
    with DeltaFile(wan["bare"]) as df:
        assert df.text is None
    _same(wan["stored"], wan["bare"])  # storing them changes nothing of the training


def test_protection_from_the_delta_alone(wan: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The cache of character 1 is deleted: its delta alone protects it, exactly as its cache
    did (same encodings, same order: the same trained values); without them it is refused."""
    code, alone = _char2(wan, "alone", base_deltas=[str(wan["stored"])])
    assert code == 0
    out = capsys.readouterr().out
    assert "protecting 4 prompt(s): 'caption 0' (run.safetensors)" in out
    code, cached = _char2(wan, "cached", base_deltas=[str(wan["bare"])], preserve_cache=[str(wan["copy"])])
    assert code == 0
    _same(alone / "out" / "run.safetensors", cached / "out" / "run.safetensors")
    # character 2's own delta carries its own captions' encodings (musubi cache: bf16)
    with DeltaFile(alone / "out" / "run.safetensors") as df:
        assert df.text_prompts == ["a cat", "a walk"] and df.text.dtypes == ("BF16",)
    # a delta that stores none, its cache gone: refused in one line, nothing written
    code, refused = _char2(wan, "refused", base_deltas=[str(wan["bare"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "protected prompt 'caption 0'" in err[0], err
    assert not (refused / "out").exists()


def test_projection_from_the_delta_alone(wan: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _char2(
        wan,
        "projection",
        base_deltas=[str(wan["stored"])],
        selector="rows",
        preserve="on",
        preserve_method="projection",
        preserve_draws=1,
        preserve_times=1,
    )
    assert code == 0
    assert "protecting 4 prompt(s): 'caption 0' (run.safetensors)" in capsys.readouterr().out


def test_stored_encodings_of_another_width_are_refused(
    wan: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    wide = _retext(wan["stored"], wan["root"] / "wide.safetensors", width=48)
    code, folder = _char2(wan, "wide", base_deltas=[str(wide)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert (
        "wide.safetensors: its stored text encodings are 48 wide but this model's text input is 32" in err[0]
    )
    assert "use a delta made for this model, or give" in err[0] and "preserve_cache" in err[0]
    assert not (folder / "out").exists()
    # the fix it names: the earlier cache folder, which then supplies the prompts
    code, _ = _char2(wan, "wide-fixed", base_deltas=[str(wide)], preserve_cache=[str(wan["copy"])])
    assert code == 0
    assert "stores text encodings 48 wide but this model's text input is 32 wide: they are not used" in (
        capsys.readouterr().out
    )
    # malformed stored encodings: refused in one line too
    bad = wan["root"] / "bad.safetensors"
    data, meta = load_file(wan["stored"]), {}
    with safe_open(str(wan["stored"]), framework="pt") as f:
        meta = dict(f.metadata())
    data["ffid.text.1"] = data["ffid.text.1"].reshape(-1)
    save_file(data, str(bad), metadata=meta)
    code, folder = _char2(wan, "bad", base_deltas=[str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "malformed" in err[0] and "re-save it" in err[0], err
    assert not (folder / "out").exists()


def test_prompts_a_delta_could_not_store_are_left_out_with_a_note(
    wan: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A delta stores at most 64 encodings: the protected prompts it recorded but does not store,
    found nowhere else, are not protected, and the log says so."""
    partial = _retext(wan["stored"], wan["root"] / "partial.safetensors", keep=2)
    code, _ = _char2(wan, "partial", base_deltas=[str(partial)])
    assert code == 0
    out = capsys.readouterr().out
    assert "protecting 2 prompt(s): 'caption 0' (partial.safetensors)" in out
    assert "2 prompt(s) of partial.safetensors ('caption 2' ...) have no text encoding in it" in out


# -- musubi-tuner (the stand-in) -----------------------------------------------------------------------
def test_preserve_deltas_protects_a_character_merged_into_the_base(
    wan: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Character 1 merged into the DiT with `ffid merge`, its cache gone: ``preserve_deltas``
    protects it from the delta's record and stored encodings without applying it again, with
    the same trained values as a run that applies it as a base delta; a missing file is refused."""
    merged = wan["root"] / "merged-dit"
    shutil.copytree(wan["dit"], merged, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = "diffusion_pytorch_model.safetensors"
    argv = ["merge", str(wan["dit"] / weights), str(wan["stored"]), "-o", str(merged / weights), "-q"]
    assert main(argv) == 0
    code, on_top = _char2(wan, "on-top", base_deltas=[str(wan["stored"])])
    assert code == 0
    capsys.readouterr()
    folder = wan["root"] / "merged-run"
    folder.mkdir()
    toml = wan_toml(
        folder, merged, wan["cache2"], ffid=2, max_train_steps=2, preserve_items=2,
        preserve_deltas=[str(wan["stored"])],
    )  # fmt: skip
    assert main(["train", "--config", str(toml)]) == 0  # preserve = auto: on for preserve_deltas
    assert "protecting 4 prompt(s): 'caption 0' (run.safetensors)" in capsys.readouterr().out
    _same(folder / "out" / "run.safetensors", on_top / "out" / "run.safetensors")
    gone = wan["root"] / "gone"
    gone.mkdir()
    nope = str(wan["root"] / "nope.safetensors")
    toml = wan_toml(gone, merged, wan["cache2"], ffid=2, preserve_deltas=[nope])
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.safetensors" in err[0], err
    assert not (gone / "out").exists()


@pytest.fixture(scope="module")
def musubi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Character 1 through the network module, its captions found through --dataset_config, saved
    with and without its encodings; then its cache deleted."""
    root = tmp_path_factory.mktemp("musubi-stored")
    cache = _te_cache(root / "char1_cache", ["a photo of character1", "a photo of character1, smiling"])
    shutil.copytree(cache, root / "cache-copy")
    config = root / "dataset.toml"
    text = f"[general]\nresolution = [64, 64]\n\n[[datasets]]\ncache_directory = {json.dumps(str(cache))}\n"
    config.write_text(text)
    out = {"root": root, "copy": root / "cache-copy", "config": config}
    for name, store in (("stored", "true"), ("bare", "false")):
        args = default_args(
            network_args=["ff=0.05", "ffid=1", f"store_encodings={store}"],
            max_train_steps=2,
            dataset_config=str(config),
            output_dir=str(root),
            output_name=name,
        )
        run_training(args).unwrapped.handle.detach()
        out[name] = root / f"{name}.safetensors"
    shutil.rmtree(cache)
    return out


def _musubi_char2(musubi: dict[str, Path], base: Path, *net: str) -> dict[str, torch.Tensor]:
    args = default_args(
        network_args=["ff=0.05", "ffid=2", "preserve_weight=50", "preserve_items=2", *net],
        base_weights=[str(base)],
        max_train_steps=3,
        learning_rate=3e-2,
    )
    res = run_training(args, transformer=tiny_wan_original())
    assert res.unwrapped.preservation is not None
    values = {n: p.detach().clone() for n, p in res.unwrapped.handle.proxies()}
    res.unwrapped.handle.detach()
    return values


def test_musubi_deltas_record_captions_and_store_encodings(musubi: dict[str, Path]) -> None:
    captions = ["a photo of character1", "a photo of character1, smiling"]
    with DeltaFile(musubi["stored"]) as df:
        assert df.text_prompts == captions and df.text_width == 16 and df.text.dtypes == ("BF16",)
        assert json.loads(df.metadata[KEY_PROMPTS]) == captions
    with DeltaFile(musubi["bare"]) as df:  # store_encodings=false: the captions are still recorded
        assert df.text is None and json.loads(df.metadata[KEY_PROMPTS]) == captions
    _same(musubi["stored"], musubi["bare"])


def test_musubi_protects_from_base_weights_alone(musubi: dict[str, Path], caplog) -> None:  # type: ignore[no-untyped-def]
    """No preserve_cache: the --base_weights delta's encodings are protected, with the same
    trained values as from the (copied) cache with a delta that stores none."""
    with caplog.at_level(logging.INFO, logger="ffid"):
        alone = _musubi_char2(musubi, musubi["stored"])
    line = "2 prompt(s) from the text encodings stored in stored.safetensors, 0 from preserve_cache"
    assert line in caplog.text
    cached = _musubi_char2(musubi, musubi["bare"], f"preserve_cache={musubi['copy']}")
    assert alone.keys() == cached.keys()
    for n in alone:
        assert torch.equal(alone[n], cached[n]), n


def test_musubi_preserve_deltas_protects_a_character_merged_into_the_dit(musubi, caplog) -> None:  # type: ignore[no-untyped-def]
    """Character 1 already in the DiT (as `ffid merge` leaves it), no --base_weights:
    ``preserve_deltas`` protects its stored captions without applying it again, and trains the
    same values as loading it with --base_weights; a missing file is refused before training."""
    import ffid

    on_top = _musubi_char2(musubi, musubi["stored"])
    dit = tiny_wan_original()
    ffid.apply_delta(dit, musubi["stored"])
    args = default_args(
        network_args=[
            "ff=0.05", "ffid=2", "preserve_weight=50", "preserve_items=2",
            f"preserve_deltas={musubi['stored']}",
        ],
        max_train_steps=3,
        learning_rate=3e-2,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="ffid"):
        res = run_training(args, transformer=dit)
    assert "2 prompt(s) from the text encodings stored in stored.safetensors" in caplog.text
    merged = {n: p.detach().clone() for n, p in res.unwrapped.handle.proxies()}
    res.unwrapped.handle.detach()
    assert merged.keys() == on_top.keys()
    for n in merged:
        assert torch.equal(merged[n], on_top[n]), n
    missing = str(musubi["root"] / "nope.safetensors")
    with pytest.raises(ConfigError, match=r"preserve_deltas: .*nope\.safetensors is not a file"):
        _musubi_char2(musubi, musubi["stored"], f"preserve_deltas={missing}")


@pytest.mark.parametrize(
    ("which", "net", "error", "needle"),
    [
        ("bare", [], ConfigError, "--base_weights bare.safetensors stores no text encodings"),
        ("wide", [], ConfigError, "its stored text encodings are 8 wide but this model's text input is 16"),
        ("bad", [], ModelFileError, "malformed"),
        ("stored", ["store_encodings=maybe"], ConfigError, "store_encodings='maybe' is not true or false"),
    ],
)
def test_musubi_refusals(musubi, which, net, error, needle):  # type: ignore[no-untyped-def]
    base = musubi["stored"]
    if which == "bare":
        base = musubi["bare"]
    elif which == "wide":
        base = _retext(base, musubi["root"] / "wide.safetensors", width=8)
    elif which == "bad":
        base = _retext(base, musubi["root"] / "bad.safetensors", keep=1)
        with safe_open(str(base), framework="pt") as f:
            meta = {**f.metadata(), KEY_TEXT_PROMPTS: '["x", "y"]'}  # 2 captions, 1 tensor
        save_file(load_file(base), str(base), metadata=meta)
    with pytest.raises(error, match=needle):
        _musubi_char2(musubi, base, *net)


def test_musubi_saves_without_encodings_when_the_cache_is_not_found(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "dataset.toml"
    config.write_text(f"[[datasets]]\ncache_directory = {json.dumps(str(tmp_path / 'nowhere'))}\n")
    args = default_args(
        network_args=["ff=0.05", "ffid=1"],
        max_train_steps=1,
        dataset_config=str(config),
        output_dir=str(tmp_path),
        output_name="char",
    )
    with caplog.at_level(logging.INFO, logger="ffid"):
        run_training(args).unwrapped.handle.detach()
    lines = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(lines) == 1 and "the deltas are saved without them" in lines[0]
    with DeltaFile(tmp_path / "char.safetensors") as df:
        assert df.text is None and KEY_PROMPTS not in df.metadata
