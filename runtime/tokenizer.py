"""Tokenizer loading (transformers) and the EOS ids a checkpoint declares."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load a tokenizer from {path}: {e}. The directory needs the "
            "checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json); "
            "pass `tokenizer=` to point elsewhere."
        ) from e


def eos_token_ids(model_dir: str | Path, hf_config: dict, tokenizer) -> frozenset[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer."""
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(hf_config.get("eos_token_id"))
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)
