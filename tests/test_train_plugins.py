"""Code a training config names by a dotted path runs only with the user's opt-in.

``model_type = "package.module:factory"`` and a dotted ``optimizer_type`` import a module and call
what it names; a config naming ``os:abort`` used to kill the process. Now ``ffid train`` refuses
them in one line (exit 2, nothing written, nothing imported) unless ``--allow_plugins`` or
``FFID_ALLOW_PLUGINS=1`` is given; built-in tasks and optimizers, entry-point tasks and
``torch.optim`` classes need no opt-in, and a config file cannot grant it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ffid.cli import main
from ffid.errors import ConfigError
from ffid.train import train
from ffid.train.plugins import ENV_ALLOW
from test_train import TinyTask, cfg_for

pytestmark = pytest.mark.usefixtures("one_thread")

# A plugin module that leaves a mark when imported (so a test sees whether it ran at all).
_PLUGIN = """
from pathlib import Path
Path({mark!r}).write_text("imported")
from test_train import TinyTask

def make_task():
    return TinyTask()
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A fresh module name on sys.path and the file its import writes; the opt-in unset."""
    name = f"ffid_probe_plugin_{abs(hash(str(tmp_path)))}"
    mark = tmp_path / "imported"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(_PLUGIN.format(mark=str(mark)))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.setenv(ENV_ALLOW, "0")  # restored at teardown, also after --allow_plugins set it
    yield name, mark
    sys.modules.pop(name, None)


def _toml(tmp_path: Path, **keys: str) -> Path:
    body = {"ff": "0.05", "ffid": "1", "max_train_steps": "1", "batch_size": "2", "logging_dir": '"none"'}
    body["output_dir"] = repr(str(tmp_path / "out")).replace("'", '"')
    body.update(keys)
    path = tmp_path / "t.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in body.items()))
    return path


@pytest.mark.parametrize("value", ["os:abort", "sys:exit", "PLUGIN:make_task", "os.path"])
def test_a_dotted_model_type_is_refused_without_the_opt_in(value, plugin, tmp_path, capsys) -> None:
    name, mark = plugin
    value = value.replace("PLUGIN", name)
    toml = _toml(tmp_path, model_type=f'"{value}"')
    assert main(["train", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"model_type {value!r}" in err[0] and "--allow_plugins" in err[0] and ENV_ALLOW in err[0]
    assert not mark.exists(), "the module was imported"
    assert not (tmp_path / "out").exists()


def test_a_dotted_optimizer_is_refused_without_the_opt_in(plugin, tmp_path, capsys) -> None:
    name, mark = plugin
    toml = _toml(tmp_path, model_type='"wan"', optimizer_type=f'"{name}.Evil"')
    assert main(["train", "--config", str(toml)]) == 2  # before the (missing) model is looked for
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"optimizer_type '{name}.Evil'" in err[0] and "--allow_plugins" in err[0]
    assert not mark.exists() and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"optimizer_type 'os\.system' would import"):
        train(cfg_for(tmp_path, optimizer_type="os.system"), task=TinyTask())  # the library too
    assert not (tmp_path / "out").exists()


def test_a_config_cannot_grant_the_opt_in(plugin, tmp_path, capsys) -> None:
    name, mark = plugin
    toml = _toml(tmp_path, model_type=f'"{name}:make_task"', allow_plugins="true")
    assert main(["train", "--config", str(toml)]) == 2
    assert "unknown config key 'allow_plugins'" in capsys.readouterr().err
    assert not mark.exists()


def test_the_opt_in_runs_the_plugin(plugin, tmp_path, monkeypatch, capsys) -> None:
    name, mark = plugin
    toml = _toml(tmp_path, model_type=f'"{name}:make_task"')
    assert main(["train", "--config", str(toml), "--allow_plugins"]) == 0
    assert mark.exists() and (tmp_path / "out" / "ffid.safetensors").is_file()
    monkeypatch.setenv(ENV_ALLOW, "1")  # the variable alone, from the library
    res = train(cfg_for(tmp_path / "lib", model_type=f"{name}:make_task", optimizer_type="torch.optim.SGD"))
    assert res.steps == 6
    monkeypatch.setenv(ENV_ALLOW, "yes")
    assert main(["train", "--config", str(toml)]) == 2
    assert f"{ENV_ALLOW}='yes' is not 0 or 1" in capsys.readouterr().err


def test_built_ins_and_torch_optimizers_need_no_opt_in(monkeypatch, tmp_path) -> None:
    from ffid.train.optim import check_optimizer_type
    from ffid.train.task import get_task

    monkeypatch.delenv(ENV_ALLOW, raising=False)
    for opt in ("AdamW", "torch.optim.RAdam", "torch.optim:Adam"):
        check_optimizer_type(opt)
    assert get_task("wan").name == "wan"
    assert get_task("demo").name == "demo"  # an entry-point task
    with pytest.raises(ConfigError, match=r"torch\.optim\.lr_scheduler\.X"):
        check_optimizer_type("torch.optim.lr_scheduler.X")
