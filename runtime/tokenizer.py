"""Tokenizer loading and the EOS ids a checkpoint declares.

An artifact whose manifest names a runtime tokenizer (compiler/
tokenizer_snapshot.py) is tokenized by the `tokenizers` library alone:
importing transformers was ~0.75 s of a cold start. Anything else loads
transformers' tokenizer.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from aotllm.graphs.manifest import Manifest, is_artifact_dir


def load_tokenizer(path: str | Path):
    """The tokenizer of an artifact or checkpoint directory, or of a GGUF file."""
    from aotllm.models.checkpoint import hf_tokenizer, open_checkpoint

    if Path(path).is_file():  # a single-file checkpoint (GGUF) carries its own
        return open_checkpoint(path).load_tokenizer()
    if is_artifact_dir(path):
        record = Manifest.read(path).extra.get("runtime_tokenizer")
        if record and (Path(path) / record["file"]).is_file():
            return ArtifactTokenizer(Path(path), record)
    return hf_tokenizer(path)


class ArtifactTokenizer:
    """encode/decode/special ids straight from `tokenizers`; everything else
    (chat templates, `LLM.get_tokenizer()`) from transformers' tokenizer of
    the same directory, loaded on first use.

    The compiler wrote the snapshot only after checking that it encodes and
    decodes exactly as that transformers tokenizer does.
    """

    def __init__(self, path: Path, record: dict):
        from tokenizers import Tokenizer

        self.path = path
        self.backend_tokenizer = Tokenizer.from_file(str(path / record["file"]))
        self.bos_token_id: int | None = record.get("bos_token_id")
        self.eos_token_id: int | None = record.get("eos_token_id")

    @functools.cached_property
    def hf(self) -> Any:
        """transformers' tokenizer of the artifact (imports transformers)."""
        from aotllm.models.checkpoint import hf_tokenizer

        return hf_tokenizer(self.path)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        if set(kwargs) - {"verbose"}:  # options only transformers implements
            return self.hf.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | list[int], skip_special_tokens: bool = False,
               **kwargs: Any) -> str:
        if kwargs:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class lacks (chat_template, pad_token, ...).
        if name.startswith("__") or name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)


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
