"""The ``causal-lm`` task: a transformers causal LM from a folder, next-token loss on text.

Data: a ``.txt`` file (the whole text), a ``.jsonl`` file (one document per line, the text in
``text_field``), or a folder of such files. Documents are tokenized with the model folder's
tokenizer, joined with the EOS token and cut into ``seq_len``-token sequences (the last
partial one is dropped unless it is the only one), the usual packing for finetuning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import train_dtype
from ..errors import ConfigError, MissingFileError, ModelFileError
from ..preserve import TextPreservation

if TYPE_CHECKING:
    from torch import nn

    from .config import TrainConfig

TEXT_SUFFIXES = (".txt", ".jsonl")


def read_documents(path: Path, text_field: str) -> list[str]:
    """The documents of a .txt/.jsonl file or of every such file in a folder (sorted by name)."""
    if not path.exists():
        raise MissingFileError(
            f"dataset {str(path)!r} does not exist; give a .txt/.jsonl file or a folder of them"
        )
    files = (
        [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
    )
    if not files:
        raise ConfigError(f"dataset folder {str(path)!r} holds no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise ConfigError(
                        f"{f}:{lineno} is not valid JSON; each .jsonl line must be one object"
                    ) from None
                if not isinstance(row, dict) or text_field not in row:
                    raise ConfigError(
                        f"{f}:{lineno} has no field {text_field!r}; set text_field to the key "
                        "holding the text"
                    )
                docs.append(str(row[text_field]))
        elif f.suffix.lower() == ".txt":
            docs.append(f.read_text(encoding="utf-8"))
        else:
            raise ConfigError(f"dataset file {str(f)!r} is neither .txt nor .jsonl")
    return [d for d in docs if d.strip()]


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length token sequences cut from the concatenated, tokenized documents."""

    def __init__(self, ids: list[int], seq_len: int, source: str):
        n = len(ids) // seq_len
        if n == 0 and len(ids) >= 2:
            n, seq_len = 1, len(ids)
        if n == 0:
            raise ConfigError(f"dataset {source!r} has no text to train on; add text or check text_field")
        self.blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class CausalLMTask:
    """Next-token cross entropy for any ``AutoModelForCausalLM`` folder."""

    name = "causal-lm"
    task_args_keys: frozenset[str] = frozenset()  # reads no task_args; any key is a mistake

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.seq_len = 512

    def _folder(self, cfg: TrainConfig) -> Path:
        if not cfg.model_path:
            raise ConfigError("model_path is not set; give a transformers model folder (save_pretrained)")
        path = Path(cfg.model_path)
        if not path.is_dir():
            raise MissingFileError(
                f"model_path {str(path)!r} is not a folder; causal-lm loads a transformers "
                "model folder with its tokenizer"
            )
        return path

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from transformers import AutoModelForCausalLM

        # 'auto' keeps the dtype the files store instead of upcasting to fp32.
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": train_dtype(cfg.model_dtype) or "auto"}
        try:
            return AutoModelForCausalLM.from_pretrained(str(self._folder(cfg)), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot load a causal LM from {cfg.model_path!r}: {exc}") from None

    def dataset(self, cfg: TrainConfig) -> torch.utils.data.Dataset:
        from transformers import AutoTokenizer

        if not cfg.dataset:
            raise ConfigError("dataset is not set; give a .txt/.jsonl file or a folder of them")
        docs = read_documents(Path(cfg.dataset), cfg.text_field)
        self.seq_len = cfg.seq_len
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self._folder(cfg)), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"no usable tokenizer in {cfg.model_path!r}: {exc}") from None
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for doc in docs:
            ids.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
        return TokenBlocks(ids, cfg.seq_len, cfg.dataset)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack([it["input_ids"] for it in items])}

    # -- what the trainer records and preserves (see ffid.preserve) ---------------------------
    def trained_prompts(self, dataset: Any) -> list[str]:
        """Nothing by default: the training text itself is not copied into the delta; give the
        texts to protect with ``preserve_prompts`` (and ``trigger_words`` are recorded)."""
        return []

    def preservation_batch(self, prompts: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError("causal-lm preservation needs the tokenizer; call dataset() first")
        return TextPreservation(self.tokenizer, self.seq_len).preservation_batch(prompts, generator)

    def preservation_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return TextPreservation.preservation_outputs(model, batch)

    def preservation_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return TextPreservation.preservation_distance(student, teacher, batch)

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids, use_cache=False).loss


__all__ = ["CausalLMTask", "TokenBlocks", "read_documents"]
