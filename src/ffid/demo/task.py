"""``DemoTask``: the demo's tiny Wan as a :class:`ffid.train.task.Task`, so ``ffid demo`` trains
its characters through the same loop as ``ffid train`` (``model_type = "demo"`` there too).

A task instance teaches one or more concepts: each concept is a prompt (``a digit character1``)
and the real digit class whose scans are its training images. Optional *prior* concepts (the
classes the base already knows, a few scans each) are mixed in, as DreamBooth-style
regularisation images are, so that teaching a character does not redraw what the base knew.
Built with no arguments (as ``ffid train`` does), it reads ``task_args``: ``concepts``
(``{"character1": 7}``), ``prior`` and ``prior_per_class``, ``caption_dropout``, and, for the
model, ``cfg.model_path`` (a base saved by :func:`save_model`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, MissingFileError, ModelFileError
from ..preserve import mse_per_item
from ..preserve.drawing import renoise
from .data import DIGIT_WORDS, Concept, encode_prompt, load_digit_images
from .model import ModelSpec, build_model, flow_matching_loss, predict, sample

if TYPE_CHECKING:
    from torch import nn

    from ..train.config import TrainConfig

SPEC_KEY = "ffid_demo.spec"  # safetensors metadata key holding the ModelSpec of a saved base
CAPTION_DROPOUT = 0.1  # share of items trained with the empty prompt, which classifier-free guidance needs


class ConceptDataset(Dataset):
    """Real digit scans paired with the embedding of their concept's prompt."""

    def __init__(
        self,
        concepts: list[Concept],
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prior: list[Concept] | None = None,
        prior_per_class: int = 0,
    ):
        if images is None or labels is None:
            images, labels = load_digit_images()
        xs, texts = [], []
        # Prior concepts contribute their first ``prior_per_class`` scans (a fixed choice, so
        # the dataset is the same in every run).
        wanted = [(c, None) for c in concepts] + [
            (c, prior_per_class) for c in (prior or []) if prior_per_class
        ]
        for concept, limit in wanted:
            chosen = images[labels == concept.digit][:limit]
            xs.append(chosen)
            texts.append(encode_prompt(concept.prompt).expand(len(chosen), -1, -1))
        self.latents = torch.cat(xs) if xs else torch.zeros(0)
        self.text = torch.cat(texts) if texts else torch.zeros(0)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[i], "text": self.text[i]}


def parse_concepts(value: Any) -> list[Concept]:
    """Concepts from ``{"character1": 7}``, ``[["character1", 7]]`` or ``"character1=7,three=3"``."""
    if isinstance(value, str):
        pairs = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, digit = part.partition("=")
            if not sep:
                raise ConfigError(
                    f"task_args.concepts entry {part!r} is not word=digit; write e.g. character1=7"
                )
            pairs.append((name.strip(), digit.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = [tuple(v) for v in value]
    concepts = []
    for name, digit in pairs:
        try:
            d = int(digit)
        except (TypeError, ValueError):
            d = -1
        if not 0 <= d <= 9:
            raise ConfigError(
                f"concept {name!r}: digit {digit!r} is not 0..9; scikit-learn's digits are 0..9"
            )
        if not str(name).isidentifier() or len(str(name).split()) != 1:
            raise ConfigError(f"concept name {name!r} must be one word such as character1")
        concepts.append(Concept(str(name), d))
    if not concepts:
        raise ConfigError("no concepts to train; set task_args.concepts, e.g. {character1 = 7}")
    return concepts


def save_model(
    model: nn.Module, spec: ModelSpec, path: Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the demo model's weights (diffusers names) and its spec to ``path``, atomically."""
    from safetensors.torch import save

    from ..train.io import atomic_write_bytes

    # The demo model is about a megabyte: serialising in memory is simpler than streaming.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {SPEC_KEY: json.dumps(spec.to_dict()), **(metadata or {})}
    atomic_write_bytes(path, save(state, metadata=meta))
    return path


def _read_demo_file(path: str | Path, tensors: bool) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec stored in a demo model file and, if asked, its tensors (else only the header)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"demo model {str(path)!r} does not exist; run `ffid demo` first to make the base"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    if SPEC_KEY not in meta:
        raise ModelFileError(f"{str(path)!r} has no {SPEC_KEY} metadata; it was not written by ffid demo")
    return ModelSpec(**json.loads(meta[SPEC_KEY])), state


def read_spec(path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` stored in a demo model file (reads the header only)."""
    return _read_demo_file(path, tensors=False)[0]


def load_model(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """A demo model saved by :func:`save_model` (or merged from one): weights and spec."""
    spec, state = _read_demo_file(path, tensors=True)
    model = build_model(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{str(path)!r} does not match its demo spec ({exc})") from None
    return model, spec


class DemoTask:
    """Flow matching on real digit scans for the demo's tiny Wan (see module docstring)."""

    name = "demo"
    task_args_keys = frozenset({"concepts", "caption_dropout", "prior", "prior_per_class"})
    # the trainer refuses rehearsal_datasets with this reason: the demo's data is built in
    rehearsal_refusal = "its data is built in; rehearse earlier concepts with task_args.prior instead"

    def __init__(
        self,
        concepts: list[Concept] | None = None,
        *,
        prior: list[Concept] | None = None,
        prior_per_class: int = 0,
        model: nn.Module | None = None,
        spec: ModelSpec | None = None,
        caption_dropout: float = CAPTION_DROPOUT,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
        sampler: Any = None,
    ):
        self.concepts = concepts
        self.prior = prior
        self.prior_per_class = prior_per_class
        self.model = model
        self.spec = spec or ModelSpec()
        self.caption_dropout = caption_dropout
        self.data = data
        self.sampler = sampler  # callable(model, step, out_dir) used by sample()

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        if self.model is not None:
            return self.model
        if not cfg.model_path:
            raise ConfigError(
                "model_path is not set; give the demo base, e.g. ffid-demo/base/base.safetensors"
            )
        model, self.spec = load_model(cfg.model_path)
        return model

    def dataset(self, cfg: TrainConfig | None) -> Dataset:
        if self.concepts is None:
            if "concepts" not in cfg.task_args:
                raise ConfigError(
                    "model_type demo needs task_args.concepts, e.g. concepts = {character1 = 7}"
                )
            self.concepts = parse_concepts(cfg.task_args["concepts"])
        if cfg is not None:
            args = cfg.task_args
            if "caption_dropout" in args:
                self.caption_dropout = float(args["caption_dropout"])
            if self.prior is None and "prior" in args:
                self.prior = parse_concepts(args["prior"])
                self.prior_per_class = int(args.get("prior_per_class", 20))
        if self.data is None and self.model is None and cfg is not None and cfg.model_path:
            # The trainer asks for the data before the model: take the image size from the file.
            self.spec = read_spec(cfg.model_path)
        images, labels = self.data if self.data is not None else load_digit_images(self.spec.image_size)
        return ConceptDataset(self.concepts, images, labels, self.prior, self.prior_per_class)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "latents": torch.stack([it["latents"] for it in items]),
            "text": torch.stack([it["text"] for it in items]),
        }

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        x0 = batch["latents"].float()
        n = x0.shape[0]
        # All randomness comes from the trainer's generator, in a fixed order, so a run repeats.
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.rand(n, generator=generator)
        drop = torch.rand(n, generator=generator) < self.caption_dropout
        text = batch["text"].float().clone()
        text[drop.to(text.device)] = 0.0
        return flow_matching_loss(model, x0, text, noise.to(x0.device), t.to(x0.device))

    # -- what the trainer records and preserves (see ffid.preserve) ---------------------------
    def trained_prompts(self, dataset: Any) -> list[str]:
        """The prompts this task teaches (recorded in the delta for later runs to protect)."""
        return [c.prompt for c in self.concepts or []]

    def regularisation_prompts(self, dataset: Any) -> list[str]:
        """The prior concepts' prompts (the base classes this run must not redraw)."""
        return [c.prompt for c in self.prior or []] if self.prior_per_class else []

    def preservation_batch(self, prompts: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Pure-noise latents at random times, one per prompt, with the prompt's embedding."""
        s = self.spec
        n = len(prompts)
        return {
            "x": torch.randn((n, s.channels, 1, s.image_size, s.image_size), generator=generator),
            "t": torch.rand(n, generator=generator),
            "text": torch.stack([encode_prompt(p) for p in prompts]),
        }

    def projection_batches(
        self, model: nn.Module, prompts: list[str], generator: torch.Generator, settings: Any
    ) -> list[dict[str, torch.Tensor]]:
        """The protected inputs of the projection method: each prompt drawn ``settings.draws`` times
        by ``model`` (its own sampler, guidance as the demo samples), each drawing re-noised at
        ``settings.times`` random times. Randomness from ``generator`` only."""
        s = self.spec
        todo = [p for p in prompts for _ in range(settings.draws)]
        seeds = torch.randint(0, 2**31 - 1, (len(todo),), generator=generator).tolist()
        drawn = sample(model, todo, seeds, steps=settings.sample_steps, spec=s).float()
        text = torch.stack([encode_prompt(p) for p in todo])
        out = []
        for _ in range(settings.times):
            t = torch.rand(len(todo), generator=generator)
            out.append({"x": renoise(drawn, t, generator), "t": t, "text": text})
        return out

    def preservation_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return predict(model, batch["x"], batch["t"], batch["text"])

    def preservation_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return mse_per_item(student, teacher)

    def sample(self, model: nn.Module, step: int, out_dir: Path) -> None:
        if self.sampler is not None:
            self.sampler(model, step, out_dir)


def base_concepts(held_out: tuple[int, ...]) -> list[Concept]:
    """The pretraining concepts: every digit except the held-out ones, named by its English word."""
    return [Concept(DIGIT_WORDS[d], d) for d in range(10) if d not in held_out]


def make_task() -> DemoTask:
    """The factory ``ffid train --model_type demo`` finds through the ``ffid.tasks`` entry point."""
    return DemoTask()
