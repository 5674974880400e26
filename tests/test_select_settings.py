"""SelectionSettings: the one checked settings object every entry point uses, and selectors as objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ffid.errors import CapacityError, ConfigError
from ffid.select import SELECTORS, SelectionSettings, plan
from ffid.select.spread import spread_capacity
from ffid.selection import overlap
from ffid.train.config import config_from_mapping

PRESET = "wan2.1-t2v-1.3b"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ff": "x", "ffid": 1}, "--ff 'x' is not a number"),
        ({"ff": 2, "ffid": 1}, "out of range"),
        ({"ff": 0.01, "ffid": -1}, "non-negative"),
        ({"ff": 0.01, "ffid": 1, "selector": "sprad"}, "did you mean 'spread'"),
        ({"ff": 0.01, "ffid": 1, "slot": 4}, "did you mean 'slots'"),
        ({"ff": 0.01, "ffid": 1, "slots": "many"}, "--slots 'many' is not an integer"),
        ({"ff": 0.01, "ffid": 1, "slots": 0}, "--slots 0 must be at least 1"),
        ({"ff": 0.01, "ffid": 1, "slots": 10**8}, "--slots 100000000 is too large: give at most 65,536"),
        ({"ff": 0.01, "ffid": 1, "seed": 2**63}, "--seed 9223372036854775808 is too large"),
        ({"ff": 0.01, "ffid": 16}, "outside the layout's ids 0..15"),
        ({"ff": 0.01, "ffid": 3, "slots": 3}, "outside the layout's ids 0..2"),
        ({"ff": 0.01, "ffid": 8, "selector": "compat-v2"}, "8 pools"),
        ({"ff": 0.01, "ffid": 1, "selector": "compat-v2", "seed": 1}, "compat-v2 takes no options"),
        ({"ff": 0.01, "ffid": 1, "include": "blocks.(("}, "not a valid regular expression"),
        ({"ff": 0.01, "ffid": 1, "block_pattern": "(("}, "not a valid regular expression"),
    ],
)
def test_bad_values_are_refused_on_creation_in_one_line(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")) as err:
        SelectionSettings.create(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("selector", "options"), [("spread", {}), ("spread", {"slots": 8, "seed": 3}), ("compat-v2", {})]
)
def test_settings_plan_what_plan_plans_and_round_trip(selector, options):
    settings = SelectionSettings.create("0.01", " 2", selector, exclude=["modulation"], **options)
    assert (settings.ff, settings.ffid) == (0.01, 2)  # strings from flags are parsed once
    sel = settings.plan(PRESET)
    assert sel.fingerprint == plan(PRESET, 0.01, 2, selector, exclude=["modulation"], **options).fingerprint
    again = SelectionSettings.from_selection(sel)
    assert again.plan(PRESET).fingerprint == sel.fingerprint
    assert SelectionSettings(**settings.to_dict()) == settings
    other = settings.replace(ffid=3)
    assert other.ffid == 3 and overlap(other.plan(PRESET), sel) == 0


def test_selectors_report_ids_options_and_capacity():
    spread, compat = SELECTORS["spread"], SELECTORS["compat-v2"]
    assert [o.name for o in spread.options] == ["slots", "seed"] and compat.options == ()
    assert spread.ids({"slots": 8, "seed": 0}) == 8 and compat.ids({}) == 8
    settings = SelectionSettings.create(0.01, 5, slots=8, seed=2)
    manifest = settings.manifest(PRESET)
    assert settings.capacity(manifest) == spread_capacity(manifest, manifest.names, 5, 8, 2)
    assert SelectionSettings.create(0.01, 5, "compat-v2").capacity(manifest) is None
    assert settings.describe() == "spread slots=8 seed=2 ff=0.01 ffid=5"


def test_fitting_options_find_the_largest_layout_that_holds_ff():
    settings = SelectionSettings.create(0.2, 0)
    manifest = settings.manifest(PRESET)
    with pytest.raises(CapacityError):
        settings.plan(manifest)
    fitting = settings.selector_object.fitting_options(
        manifest, settings.eligible(manifest), 0.2, 0, settings.resolved_options
    )
    assert fitting is not None and fitting["slots"] < 16
    settings.replace(options=fitting).plan(manifest)  # fits
    with pytest.raises(CapacityError):
        settings.replace(options={**fitting, "slots": fitting["slots"] + 1}).plan(manifest)


def test_train_config_trains_the_layout_plan_shows():
    """ffid train had no layout seed: selector_args now reaches the selector like --seed does."""
    cfg = config_from_mapping({"ff": 0.01, "ffid": 1, "selector_args": {"seed": 3, "slots": 8}})
    shown = plan(PRESET, 0.01, 1, "spread", seed=3, slots=8)
    assert cfg.selection().plan(PRESET).fingerprint == shown.fingerprint
    legacy = config_from_mapping({"ff": 0.01, "ffid": 1, "slots": 8, "selector_args": ["seed=3"]})
    assert legacy.selection() == cfg.selection()
    with pytest.raises(ConfigError, match="both set the layout"):
        config_from_mapping({"ff": 0.01, "ffid": 1, "slots": 8, "selector_args": {"slots": "8"}})
    # how the options are written does not change what resume checks; without options the keys
    # are those of states saved before selector_args existed
    same = config_from_mapping({"ff": 0.01, "ffid": 1, "selector_args": {"slots": "8", "seed": 3}})
    assert same.trajectory_hash() == legacy.trajectory_hash() == cfg.trajectory_hash()
    plain = config_from_mapping({"ff": 0.01, "ffid": 1}).trajectory_keys()
    assert plain["slots"] is None and "selector_args" not in plain
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        config_from_mapping({"ff": 0.01, "ffid": 1, "selector_args": {"sed": 3}})
    with pytest.raises(ConfigError, match=r"selector_args\.slots = 'x' is not an integer"):
        config_from_mapping({"ff": 0.01, "ffid": 1, "selector_args": {"slots": "x"}})


def test_no_selector_is_named_outside_select():
    """Callers hold selector objects; a selector's name as a literal belongs to ffid/select only."""
    root = Path(__file__).resolve().parents[1] / "src" / "ffid"
    names = set(SELECTORS)
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "select":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, "selector names outside ffid/select: " + ", ".join(found)


def test_the_preservation_weight_has_one_default():
    """TrainConfig must stay importable without torch, so it spells the default; it must agree."""
    from ffid.demo.config import DemoConfig
    from ffid.integrations.musubi import MusubiConfig
    from ffid.preserve import DEFAULT_WEIGHT
    from ffid.train.config import TrainConfig

    settings = SelectionSettings.create(0.01, 1)
    assert TrainConfig().preserve_weight == DemoConfig().preserve_weight == DEFAULT_WEIGHT
    assert MusubiConfig(selection=settings).preserve.weight == DEFAULT_WEIGHT


def test_huge_selector_options_are_refused_at_once(tmp_path: Path) -> None:
    """``--slots 100000000`` in ffid plan and ``slots = 100000000000`` in ffid train ran until
    killed; now each is one line and exit 2, within seconds (a fresh process, so a hang shows
    as a timeout instead of stalling the suite)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    toml = tmp_path / "t.toml"
    toml.write_text(
        f'model_type = "wan"\nff = 0.01\nffid = 1\noutput_dir = "{out}"\n'
        f'model_path = "{tmp_path}"\ndataset = "{tmp_path}"\nselector_args = {{slots = 100000000000}}\n'
    )
    plan_argv = ["plan", "wan2.2-t2v-14b", "--ff", "0.01", "--ffid", "1", "--slots", "100000000"]
    for argv, value in (
        (plan_argv, "--slots 100000000"),
        (["train", "--config", str(toml)], "selector_args.slots = 100000000000"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "ffid", *argv], capture_output=True, text=True, timeout=120
        )
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert f"{value} is too large: give at most 65,536" in err[0], err[0]
    assert not out.exists()
    assert SelectionSettings.create(0.01, 1, slots=65_536).ids() == 65_536
