"""The trainer on a tiny task of its own: resume equality, saving, errors, block swap, config keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ffid.cli import main
from ffid.errors import ConfigError, MismatchError, TrainingError
from ffid.train import TrainConfig, config_from_mapping, load_config, train
from ffid.train.data import BatchOrder

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16)) for _ in range(3)
        )
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class TinyTask:
    """Regression with input noise drawn from the trainer's generator (so resume must restore it)."""

    name = "tiny"

    def __init__(self, items: int = 10, poison_at: int | None = None):
        self.items = items
        self.poison_at = poison_at
        self.calls = 0
        self.samples: list[int] = []

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        return TinyNet()

    def dataset(self, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(self.items, 6, generator=g)
        y = torch.stack([x[:, :3].sum(1), x[:, 3:].prod(1)], 1)
        return [{"x": x[i], "y": y[i]} for i in range(self.items)]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        x = batch["x"] + 0.05 * torch.randn(batch["x"].shape, generator=generator)
        loss = nn.functional.mse_loss(model(x), batch["y"])
        if self.poison_at is not None and self.calls >= self.poison_at:
            loss = loss * float("nan")
        return loss

    def sample(self, model: nn.Module, step: int, out_dir: Path) -> None:
        self.samples.append(step)


def cfg_for(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        model_type="tiny",
        ff=0.05,
        ffid=1,
        learning_rate=3e-2,
        max_train_steps=6,
        batch_size=3,
        seed=5,
        output_dir=str(tmp_path / "out"),
        output_name="run",
        progress=False,
        logging_dir="none",
    )
    base.update(kw)
    return config_from_mapping(base)


def test_losses_fall_and_outputs_are_written(tmp_path: Path) -> None:
    task = TinyTask()
    res = train(cfg_for(tmp_path, max_train_steps=30, save_every_n_steps=10), task=task)
    out = tmp_path / "out"
    assert res.steps == 30 and len(res.losses) == 30
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    assert (out / "run.safetensors").is_file()
    assert (out / "run-step00000010.safetensors").is_file() and (
        out / "run-step00000020.safetensors"
    ).is_file()
    assert (out / "run-loss.png").stat().st_size > 1000
    assert json.loads((out / "run-loss.json").read_text())["losses"] == res.losses
    from ffid.checkpoint import load_delta

    delta = load_delta(out / "run.safetensors")
    assert delta.info.selection_fingerprint == res.selection.fingerprint
    # the model's own weights were not written: only the delta differs from the base
    fresh = TinyNet()
    res.handle.detach()
    for (n, a), (_, b) in zip(res.model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    # grad accumulation, a warm-up + cosine schedule and an epoch boundary inside the run
    kw = dict(max_train_steps=8, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2)
    full = train(cfg_for(tmp_path / "a", **kw), task=TinyTask())
    part = train(cfg_for(tmp_path / "b", save_every_n_steps=3, save_state=True, **kw), task=TinyTask())
    assert part.losses == full.losses
    state = tmp_path / "b" / "out" / "run-step00000003-state"
    assert (state / "state.json").is_file()
    resumed = train(cfg_for(tmp_path / "b", resume=str(state), **kw), task=TinyTask())
    assert resumed.losses == full.losses  # bit-for-bit, loss history included
    assert resumed.steps == 8
    a, b = full.handle.trained_values(), resumed.handle.trained_values()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 'latest' finds the newest state of this output_name
    latest = train(
        cfg_for(
            tmp_path / "b",
            resume="latest",
            max_train_steps=10,
            **{k: v for k, v in kw.items() if k != "max_train_steps"},
        ),
        task=TinyTask(),
    )
    assert latest.losses[:8] == full.losses


def test_resume_from_another_run_is_refused(tmp_path: Path) -> None:
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    with pytest.raises(MismatchError, match="selection"):
        train(cfg_for(tmp_path, resume=str(state), ffid=2), task=TinyTask())
    with pytest.raises(MismatchError, match="learning_rate"):
        train(cfg_for(tmp_path, resume=str(state), learning_rate=1e-3), task=TinyTask())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(cfg_for(tmp_path, resume=str(tmp_path / "nope")), task=TinyTask())


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"at step 5 .*run-step00000004\.safetensors"):
        train(cfg_for(tmp_path, max_train_steps=8, save_every_n_steps=2), task=TinyTask(poison_at=5))
    out = tmp_path / "out"
    assert (out / "run-step00000004.safetensors").is_file()
    assert not (out / "run.safetensors").exists()


def test_block_swap_is_the_same_computation(tmp_path: Path) -> None:
    plain = train(cfg_for(tmp_path / "a"), task=TinyTask())
    swapped = train(cfg_for(tmp_path / "b", blocks_to_swap=2), task=TinyTask())
    assert swapped.losses == plain.losses
    ckpt = train(cfg_for(tmp_path / "c", blocks_to_swap=2, gradient_checkpointing=False), task=TinyTask())
    assert ckpt.losses == plain.losses
    with pytest.raises(ConfigError, match="at most 3"):
        train(cfg_for(tmp_path / "d", blocks_to_swap=4), task=TinyTask())


def test_sampling_and_epochs(tmp_path: Path) -> None:
    task = TinyTask(items=7)
    res = train(
        cfg_for(
            tmp_path, max_train_steps=None, max_train_epochs=2, sample_every_n_steps=2, save_every_n_epochs=1
        ),
        task=task,
    )
    assert res.steps == 6  # 7 items, batch 3 -> 3 micro-batches per epoch
    assert task.samples == [2, 4, 6]
    assert (tmp_path / "out" / "run-000001.safetensors").is_file()


def test_batch_order_covers_each_epoch_once() -> None:
    order = BatchOrder(items=10, batch_size=2, seed=1, rank=0, world=2)
    other = BatchOrder(items=10, batch_size=2, seed=1, rank=1, world=2)
    seen = [i for b in range(order.batches_per_epoch) for o in (order, other) for i in o.batch(0, b)]
    assert sorted(seen[:10]) == list(range(10))
    assert order.permutation(0).tolist() != order.permutation(1).tolist()


def test_batch_order_with_buckets_never_mixes_them() -> None:
    groups = (0, 1, 0, 2, 1, 0, 0, 1, 2, 0, 0)  # 6 + 3 + 2 items
    orders = [BatchOrder(11, 2, seed=3, rank=r, world=2, groups=groups) for r in (0, 1)]
    assert orders[0].batches_per_epoch == 2 + 1 + 1  # ceil(6/4) + ceil(3/4) + ceil(2/4)
    for epoch in (0, 1):
        seen = []
        for b in range(orders[0].batches_per_epoch):
            ids = [i for o in orders for i in o.batch(epoch, b)]
            assert len({groups[i] for i in ids}) == 1, ids  # one bucket per global batch
            seen += ids
        assert set(seen) == set(range(11))  # every item each epoch (short batches wrap within the bucket)
    plans = [[c.tolist() for c, _ in orders[0].plan(e)] for e in (0, 1)]
    assert plans[0] != plans[1]  # shuffled afresh each epoch, from the seed alone
    again = BatchOrder(11, 2, seed=3, rank=0, world=2, groups=groups)
    assert [c.tolist() for c, _ in again.plan(0)] == plans[0]
    it = again.iterate(1, 2)  # resuming mid-epoch gives the uninterrupted run's batches
    assert [next(it)[2] for _ in range(2)] == [orders[0].batch(1, 2), orders[0].batch(1, 3)]
    # without buckets: the plain permutation, cut in order
    plain = BatchOrder(5, 2, seed=3)
    assert [plain.batch(0, b) for b in range(3)] == [
        plain.permutation(0)[s : s + 2].tolist() for s in (0, 2, 4)
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rat": 1e-4}, "did you mean 'learning_rate'"),
        ({"batch_size": "two"}, "batch_size = 'two'"),
        ({"mixed_precision": "bf17"}, "did you mean 'bf16'"),
        ({"batch_size": 0}, "at least 1"),
        ({"optimizer_args": ["lr"]}, "not k=v"),
        ({"max_grad_norm": -1}, "max_grad_norm"),
    ],
)
def test_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(values)


def test_toml_tables_flags_and_aliases(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('dit = "m"\n[training]\nlearning_rate = 2e-4\nff = 0.1\n[task_args]\nx = 1\n')
    cfg = load_config(toml, {"learning_rate": "5e-5"})
    assert (cfg.model_path, cfg.learning_rate, cfg.ff, cfg.task_args) == ("m", 5e-5, 0.1, {"x": 1})
    toml.write_text("[training]\nlearning_rat = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' \(in .*t.toml\); did you mean"):
        load_config(toml)


def test_optimizers_and_schedulers(tmp_path: Path) -> None:
    for opt in ("SGD", "Adafactor", "torch.optim.RAdam"):
        res = train(
            cfg_for(
                tmp_path / opt,
                optimizer_type=opt,
                max_train_steps=2,
                learning_rate=1e-3,
                optimizer_args=["weight_decay=0.0"] if opt != "Adafactor" else [],
            ),
            task=TinyTask(),
        )
        assert all(math.isfinite(v) for v in res.losses)
    with pytest.raises(ConfigError, match="did you mean 'AdamW'"):
        train(cfg_for(tmp_path, optimizer_type="AdamWW"), task=TinyTask())
    with pytest.raises(ConfigError, match="unknown lr_scheduler"):
        train(cfg_for(tmp_path, lr_scheduler="cosin"), task=TinyTask())


def test_cli_errors_exit_2_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    toml = tmp_path / "t.toml"
    toml.write_text(
        f'model_type = "wan"\nff = 0.01\nffid = 1\noutput_dir = "{out}"\n'
        f'dataset = "{tmp_path / "missing"}"\nmodel_path = "{tmp_path}"\n'
    )
    assert main(["train", "--config", str(toml)]) == 2
    assert "ffid train: error: dataset folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--config", str(toml), "--dataset", str(tmp_path / "empty")]) == 2
    assert "holds no training items" in capsys.readouterr().err
    assert main(["train", "--config", str(toml), "--ff", "2"]) == 2
    assert "--ff" in capsys.readouterr().err
    # a misspelt flag is not taken as an abbreviation: one line suggesting the right one
    assert main(["train", "--config", str(toml), "--learning_rat", "1"]) == 2
    assert "did you mean --learning_rate?" in capsys.readouterr().err
    assert not out.exists()


EXAMPLES = [
    "wan21-t2v-14b.toml",
    "llm-causal.toml",
    "demo-model.toml",
    "demo-projection-1.toml",
    "demo-projection-2.toml",
    "wan22-projection-1.toml",
    "wan22-projection-2.toml",
]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_are_valid(name: str) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / name
    cfg = load_config(path)
    assert cfg.ff and cfg.ffid is not None and cfg.output_name


def test_docs_list_every_key() -> None:
    """docs/train.md shows the table derived from TrainConfig, so a new key cannot go undocumented."""
    from ffid.train.config import keys_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "train.md"
    assert keys_markdown() in docs.read_text(encoding="utf-8"), (
        "docs/train.md is out of date: paste ffid.train.config.keys_markdown() under '## All keys'"
    )


def test_a_refused_run_leaves_the_callers_model_detached(tmp_path):
    """Whatever refuses after attaching (here the optimizer), the model passed in is given back
    as it was, and nothing is written."""
    import ffid

    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="optimizer_type"):
        train(cfg_for(tmp_path, optimizer_type="NoSuchOptimizer"), task=TinyTask(), model=model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ffid.attach(model, ff=0.05, ffid=1).detach()  # attachable again: the refused run let go
    assert not (tmp_path / "out").exists()


def test_preserve_deltas_counts_for_resume_only_when_set() -> None:
    """A key added after states were saved leaves their hash as it was while unset (so they still
    resume), and changes it when set (a run protecting other characters computes other values)."""
    from ffid.train.config import TrainConfig

    kw = {"model_path": "x", "dataset": "y", "ff": 0.01, "ffid": 1}
    bare, merged = TrainConfig(**kw), TrainConfig(**kw, preserve_deltas=["/a/char1.safetensors"])
    assert "preserve_deltas" not in bare.trajectory_keys()
    assert merged.trajectory_keys()["preserve_deltas"] == ["char1.safetensors"]
    assert bare.trajectory_hash() != merged.trajectory_hash()
