"""Tokenizer loading (transformers) and the EOS ids a checkpoint declares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path):
    """The tokenizer of an artifact or checkpoint directory, or of a GGUF file."""
    from aotllm.models.checkpoint import hf_tokenizer, open_checkpoint

    if Path(path).is_file():  # a single-file checkpoint (GGUF) carries its own
        return open_checkpoint(path).load_tokenizer()
    return hf_tokenizer(path)


def eos_token_ids(model_dir: str | Path, hf_config: dict, tokenizer,
                  generation_config: dict[str, Any] | None = None) -> frozenset[int]:
    """EOS ids from the config, the generation config and the tokenizer.

    `generation_config` defaults to model_dir's generation_config.json; a
    checkpoint source passes its own (a GGUF file has it in its metadata).
    """
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(hf_config.get("eos_token_id"))
    if generation_config is None:
        gen = Path(model_dir) / "generation_config.json"
        generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
    add(generation_config.get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)
