"""Text encodings stored in a delta (``ffid.text.*`` + ``ffid.text_prompts``, docs/delta-format.md):
round trip in both formats over the test matrix, every other reader ignoring or keeping them,
malformed files refused ("re-save it"), the writer's refusals, the documented size bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.test_checkpoint import StandInHandle, save_state

import ffid
from ffid.checkpoint import apply_delta, save_delta
from ffid.checkpoint.delta import (
    KEY_TEXT_PROMPTS,
    MAX_TEXT_ENCODINGS,
    DeltaFile,
    first_stored,
    load_delta,
)
from ffid.checkpoint.delta_text import text_bytes, worst_case_bytes
from ffid.cli import main
from ffid.errors import ConfigError, ModelFileError
from ffid.integrations.musubi_weights import _delta_from_weights
from matrix import CASES, MODELS, make
from tiny_models import tiny_wan


def encodings(width: int = 32, n: int = 3, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``n`` caption -> ``[tokens, width]`` encodings of varying token counts (as musubi caches them)."""
    g = torch.Generator().manual_seed(width + n)
    return {f"a photo of ohwx, take {i}": torch.randn(4 + i, width, generator=g).to(dtype) for i in range(n)}


def same_text(path: Path, text: dict[str, torch.Tensor], base=None) -> None:  # type: ignore[no-untyped-def]
    with DeltaFile(path, base=base) as df:
        got = df.text_encodings()
        assert df.text_count == len(text) and df.text_prompts == list(text)
        assert df.text_width == next(iter(text.values())).shape[1]
    assert list(got) == list(text)
    for p, t in text.items():
        assert got[p].dtype == t.dtype and torch.equal(got[p], t), p


# -- round trip over the matrix, formats 1 and 2 --------------------------------------------------------
@pytest.mark.parametrize("indices", ["explicit", "implicit"])
@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_round_trip_and_the_weights_are_untouched(tmp_path, model_key, sel_key, indices):
    """Stored encodings come back bit for bit in their dtype, and the delta's values, positions
    and what apply_delta makes of it are those of the same delta without them."""
    model, sel, _ = make(model_key, sel_key)
    handle = StandInHandle(model, sel, seed=3)
    text = encodings(width=24)
    with_text, plain = tmp_path / "with.safetensors", tmp_path / "plain.safetensors"
    save_delta(handle, with_text, text=text, indices=indices)
    save_delta(handle, plain, indices=indices)
    same_text(with_text, text, base=model)
    a, b = load_delta(with_text, base=model), load_delta(plain, base=model)
    assert a.info.selection_fingerprint == b.info.selection_fingerprint == sel.fingerprint
    assert a.tensors.keys() == b.tensors.keys()
    for n in a.tensors:
        assert torch.equal(a.tensors[n].indices, b.tensors[n].indices), n
        assert torch.equal(a.tensors[n].values, b.tensors[n].values), n
    applied = {}
    for path in (with_text, plain):
        fresh = MODELS[model_key].build()
        assert apply_delta(fresh, path).elements == sel.selected
        applied[path.name] = fresh.state_dict()
    for k, v in applied["plain.safetensors"].items():
        assert torch.equal(applied["with.safetensors"][k], v), k


def test_older_deltas_load_unchanged(tmp_path):
    model = tiny_wan()
    path = tmp_path / "old.safetensors"
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), path)
    with DeltaFile(path) as df:
        assert df.text is None and df.text_count == 0 and df.text_width is None
        assert df.text_prompts == [] and df.text_encodings() == {}
    assert "ffid.text.0" not in load_file(path)


# -- the other readers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Wan base file, and one delta saved with and without stored encodings."""
    tmp = tmp_path_factory.mktemp("text")
    model = tiny_wan()
    save_state(model, tmp / "base.safetensors")
    handle = StandInHandle(model, ffid.plan(model, 0.05, 1), seed=1)
    save_delta(handle, tmp / "with.safetensors", text=encodings())
    save_delta(handle, tmp / "plain.safetensors")
    return tmp


def test_merge_ignores_them(files, tmp_path):
    outs = []
    for name in ("with", "plain"):
        out = tmp_path / f"merged-{name}.safetensors"
        argv = ["merge", str(files / "base.safetensors"), str(files / f"{name}.safetensors"), "-o", str(out)]
        assert main([*argv, "-q"]) == 0
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()  # a full checkpoint: nothing of the text
    assert not any(k.startswith("ffid.") for k in load_file(outs[0]))


def test_inspect_shows_count_and_bytes(files, capsys):
    assert main(["inspect", str(files / "with.safetensors")]) == 0
    out = capsys.readouterr().out
    tokens = 4 + 5 + 6
    assert (
        f"text encodings 3 prompt(s) stored, {tokens} tokens x width 32, BF16, {tokens * 32 * 2:,} bytes"
        in out
    )
    assert main(["inspect", "--json", str(files / "with.safetensors")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_encodings"] == {
        "count": 3, "width": 32, "dtypes": ["BF16"], "tokens": tokens, "bytes": tokens * 32 * 2,
    }  # fmt: skip
    assert main(["inspect", "--json", str(files / "plain.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["text_encodings"] is None


def test_convert_keeps_them_in_both_directions(files, tmp_path):
    v2, v1 = tmp_path / "v2.safetensors", tmp_path / "v1.safetensors"
    base = str(files / "base.safetensors")
    argv = [
        "convert",
        str(files / "with.safetensors"),
        "--indices",
        "implicit",
        "--base",
        base,
        "-o",
        str(v2),
    ]
    assert main([*argv, "--value_dtype", "bf16"]) == 0
    same_text(v2, encodings(), base=files / "base.safetensors")
    assert main(["convert", str(v2), "--indices", "explicit", "--base", base, "-o", str(v1)]) == 0
    same_text(v1, encodings())  # the values were narrowed; the encodings keep their own dtype
    assert load_delta(v1).info.value_dtype == "BF16"


def test_convert_drop_text_leaves_them_out_and_keeps_the_layout(files, tmp_path, capsys):
    """``--drop_text`` writes the same delta without its encodings; with no ``--indices`` the
    input's layout is kept, so the weights part is byte-for-byte what a delta saved without
    text holds."""
    out = tmp_path / "dropped.safetensors"
    assert main(["convert", str(files / "with.safetensors"), "--drop_text", "-o", str(out)]) == 0
    assert "3 stored text encodings left out" in capsys.readouterr().out
    with DeltaFile(out) as df, DeltaFile(files / "with.safetensors") as src:
        assert df.text_count == 0 and df.text_encodings() == {}
        assert df.implicit == src.implicit and df.names == src.names
        for n in df.names:
            assert torch.equal(df.read_values(n), src.read_values(n)), n
    plain = load_file(files / "plain.safetensors")
    dropped = load_file(out)
    assert dropped.keys() == plain.keys()
    for k, v in dropped.items():
        assert torch.equal(v, plain[k]), k
    again = tmp_path / "again.safetensors"  # nothing to drop: a plain copy, and it says none
    assert main(["convert", str(out), "--drop_text", "-o", str(again)]) == 0
    assert "left out" not in capsys.readouterr().out


def test_extract_stores_none(files, tmp_path):
    merged, out = tmp_path / "m.safetensors", tmp_path / "x.safetensors"
    assert (
        main(["merge", str(files / "base.safetensors"), str(files / "with.safetensors"), "-o", str(merged)])
        == 0
    )
    assert main(["extract", str(files / "base.safetensors"), str(merged), "-o", str(out), "-q"]) == 0
    with DeltaFile(out) as df:
        assert df.text is None and df.names


def test_the_musubi_weights_path_skips_them(files):
    """musubi's --network_weights / --base_weights hand over every tensor of the file."""
    model = tiny_wan()
    a = _delta_from_weights(load_file(files / "with.safetensors"), model)
    b = _delta_from_weights(load_file(files / "plain.safetensors"), model)
    assert a.tensors.keys() == b.tensors.keys() and a.selected == b.selected
    for n in a.tensors:
        assert torch.equal(a.tensors[n].values, b.tensors[n].values), n
    stray = {**load_file(files / "with.safetensors"), "lora_unet_x.alpha": torch.ones(1)}
    with pytest.raises(ModelFileError, match="not an ffid delta"):
        _delta_from_weights(stray, model)


# -- malformed files ---------------------------------------------------------------------------------------
def _tamper(src: Path, dst: Path, tensors=None, meta=None) -> Path:  # type: ignore[no-untyped-def]
    """``src`` rewritten with some tensors and metadata keys replaced (None removes one)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    data = load_file(src)
    for k, v in (tensors or {}).items():
        data.pop(k, None) if v is None else data.__setitem__(k, v)
    for k, v in (meta or {}).items():
        metadata.pop(k, None) if v is None else metadata.__setitem__(k, v)
    save_file(data, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize(
    ("tensors", "meta", "needle"),
    [
        ({}, {KEY_TEXT_PROMPTS: json.dumps(["a", "b", "c", "d"])}, r"lists 4 caption\(s\)"),
        ({}, {KEY_TEXT_PROMPTS: None}, "but no 'ffid.text_prompts' metadata"),
        ({}, {KEY_TEXT_PROMPTS: '{"a": 1}'}, "is not a JSON list of strings"),
        ({}, {KEY_TEXT_PROMPTS: json.dumps(["a", "a", "b"])}, "names a caption twice"),
        ({"ffid.text.2": torch.zeros(6 * 32)}, {}, r"has shape \[192\], an encoding is \[tokens, width\]"),
        ({"ffid.text.1": torch.zeros(5, 32, dtype=torch.int32)}, {}, "holds I32, encodings must be floats"),
        ({"ffid.text.1": torch.zeros(5, 16)}, {}, "'ffid.text.1' is 16 wide, 'ffid.text.0' 32"),
        ({"ffid.text.1": None, "ffid.text.3": torch.zeros(5, 32)}, {}, r"lists 3 caption\(s\)"),
    ],
)
def test_malformed_encodings_are_refused(files, tmp_path, capsys, tensors, meta, needle):
    bad = _tamper(files / "with.safetensors", tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(ModelFileError, match=needle) as err:
        DeltaFile(bad)
    assert "re-save it" in str(err.value)
    assert main(["inspect", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "stored text encodings are malformed" in lines[0]


def test_an_unknown_ffid_text_key_is_an_unexpected_tensor(files, tmp_path):
    bad = _tamper(
        files / "with.safetensors", tmp_path / "bad.safetensors", {"ffid.text.x": torch.zeros(2, 32)}
    )
    with pytest.raises(
        ModelFileError, match=r"unexpected tensor 'ffid\.text\.x' in a delta file; re-save it"
    ):
        DeltaFile(bad)


# -- the writer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (encodings(n=MAX_TEXT_ENCODINGS + 1), f"stores at most {MAX_TEXT_ENCODINGS}"),
        ({**encodings(), "wide": torch.zeros(3, 16)}, r"differ in width \(32 and 16"),
        ({"ids": torch.zeros(3, 8, dtype=torch.int64)}, "it must be a float"),
        ({"flat": torch.zeros(8)}, "it must be a float"),
        ({"nan": torch.full((2, 8), float("nan"))}, "holds 16 NaN/inf values; encode it again"),
    ],
)
def test_the_writer_refuses_what_breaks_the_format(tmp_path, text, needle):
    model = tiny_wan()
    out = tmp_path / "d.safetensors"
    with pytest.raises(ConfigError, match=needle):
        save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), out, text=text)
    assert not out.exists()
    with pytest.raises(ConfigError, match="is reserved by the delta format"):
        save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), out, metadata={KEY_TEXT_PROMPTS: "[]"})
    assert not out.exists()


def test_which_prompts_are_stored_and_the_size_bounds():
    """The first 64 distinct recorded prompts that have an encoding, in recorded order; the worst
    case at Wan 14B and the typical case docs/delta-format.md states."""
    prompts = [f"p{i}" for i in range(100)]
    have = {p for i, p in enumerate(prompts) if i % 3}  # p0, p3, ... have no encoding
    chosen = first_stored(["p1", *prompts], have)
    assert len(chosen) == MAX_TEXT_ENCODINGS and chosen[:3] == ["p1", "p2", "p4"]
    assert worst_case_bytes() == 64 * 512 * 4096 * 2 == 256 * 2**20
    assert text_bytes(30, 50, 4096) == 12_288_000  # 30 captions of 50 tokens: 11.7 MiB
    doc = (Path(__file__).resolve().parents[1] / "docs" / "delta-format.md").read_text()
    assert "268,435,456 bytes (256 MiB)" in doc and "12,288,000 bytes (11.7 MiB)" in doc
