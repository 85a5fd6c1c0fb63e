"""Checkpoint sources: where a model's config, weights and tokenizer come from.

The weight loader, the compiler (weights, tokenizer, compile cache) and the
eager runtime read a checkpoint only through `CheckpointSource`, so a new
on-disk format is one class and one `_SOURCES` entry here; nothing downstream
changes. Two formats exist today: a Hugging Face safetensors directory and a
llama.cpp GGUF file (`models/gguf_checkpoint.py`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm import tqdm

from aotllm.models.gguf_checkpoint import GGUFCheckpoint, is_gguf_file


class TensorPart(Protocol):
    """A checkpoint tensor not read yet (safetensors' slice): its shape, and
    indexing with ranges reads only those bytes."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


@runtime_checkable
class CheckpointSource(Protocol):
    """One checkpoint on disk, read lazily: nothing heavy happens in __init__."""

    path: Path

    def describe(self) -> str:
        """What the checkpoint is, for error messages ("checkpoint in DIR", ...)."""
        ...

    def cache_name(self) -> str:
        """A readable stem for the compile-cache directory of this checkpoint."""
        ...

    def content_hash(self) -> str:
        """A hex digest that changes when the checkpoint's content does (compile-cache key)."""
        ...

    def raw_config(self) -> dict[str, Any]:
        """The model config as a config.json-like dict (with `architectures`, `model_type`)."""
        ...

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json-like dict (eos ids, ...); {} when the checkpoint has none."""
        ...

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, tensor) pairs, one tensor materialised at a time."""
        ...

    def tensor_parts(self) -> Iterator[tuple[str, "torch.Tensor | TensorPart"]]:
        """As `tensors`, but a reader that can read part of a tensor yields a
        `TensorPart` instead, so a tensor-parallel rank reads only its rows
        and columns (models/weights.py: `Shard.load`)."""
        ...

    def load_tokenizer(self) -> Any:
        """The transformers tokenizer of this checkpoint."""
        ...

    def save_tokenizer(self, out_dir: Path) -> None:
        """Write the tokenizer as ordinary HF files (+ generation_config.json) into out_dir."""
        ...


def hf_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """AutoTokenizer.from_pretrained with an error that says what is missing."""
    from transformers import AutoTokenizer

    # Never run a checkpoint's own tokenizer code (nor ask whether to): a
    # remote-code checkpoint (ChatGLM, InternLM2) with a tokenizer.json loads
    # as a fast tokenizer from that file.
    kwargs.setdefault("trust_remote_code", False)
    if "gguf_file" not in kwargs and _remote_tokenizer(Path(path)) is not None \
            and (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        kwargs.pop("trust_remote_code")
        return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        remote = _remote_tokenizer(Path(path))
        if remote is not None and "gguf_file" not in kwargs:
            raise ValueError(
                f"could not load a tokenizer from {path}: its tokenizer is remote code "
                f"({remote}), which aotllm does not run, and it has no tokenizer.json. "
                "Convert the tokenizer to a fast one (tokenizer.json) where you trust the "
                "code, or pass `tokenizer=` to point elsewhere."
            ) from e
        if "gguf_file" in kwargs:
            where = Path(path) / kwargs["gguf_file"]
            needs = "The file needs tokenizer.ggml.* metadata (tokens, merges, model)"
        else:
            where = path
            needs = ("The directory needs the checkpoint's tokenizer files "
                     "(tokenizer.json, tokenizer_config.json)")
        raise ValueError(
            f"could not load a tokenizer from {where}: {e}. {needs}; pass `tokenizer=` "
            "to point elsewhere."
        ) from e


def _remote_tokenizer(path: Path) -> str | None:
    """The remote-code tokenizer class tokenizer_config.json names, if any."""
    config = path / "tokenizer_config.json"
    try:
        auto = json.loads(config.read_text()).get("auto_map", {}).get("AutoTokenizer")
    except (OSError, ValueError):
        return None
    if not auto:
        return None
    return auto[0] if isinstance(auto, list) else str(auto)


class SafetensorsCheckpoint:
    """A local Hugging Face checkpoint directory: config.json, *.safetensors, tokenizer files."""

    # Files whose content defines the checkpoint (hashed for the compile cache).
    _CONTENT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
    _TOKENIZER_SIDE_FILES = ("generation_config.json",)
    # Tensors some exporters save that are derived, not weights.
    _IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def describe(self) -> str:
        return f"checkpoint in {self.path}"

    def cache_name(self) -> str:
        return self.path.resolve().name

    def content_hash(self) -> str:
        # Every config, tokenizer and weight file, in full.
        h = hashlib.sha256()
        files = sorted({p for pat in self._CONTENT_PATTERNS for p in self.path.glob(pat)})
        for path in files:
            h.update(path.name.encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
        return h.hexdigest()

    def raw_config(self) -> dict[str, Any]:
        path = self.path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json in {self.path}: point `model` at a local Hugging Face "
                "checkpoint directory (config.json, *.safetensors, tokenizer files), "
                "a .gguf file, or an aotllm artifact directory"
            )
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e

    def generation_config(self) -> dict[str, Any]:
        path = self.path / "generation_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [self.path / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index.name} in {self.path} lists weight files that are missing: "
                    f"{', '.join(missing)}. Copy the complete checkpoint."
                )
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            extra = ""
            if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
                extra = (
                    " It has PyTorch .bin/.pt weights: convert them to safetensors "
                    "(load with transformers and save_pretrained(..., safe_serialization=True))."
                )
            raise FileNotFoundError(f"no *.safetensors weight files in {self.path}.{extra}")
        return files

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._read(parts=False)

    def tensor_parts(self) -> Iterator[tuple[str, TensorPart]]:
        return self._read(parts=True)

    def _read(self, parts: bool) -> Iterator[tuple[str, Any]]:
        from safetensors import SafetensorError, safe_open

        files = self.files()
        for path in tqdm(files, desc="Loading safetensors checkpoint shards", unit="shard",
                         disable=len(files) < 2):
            try:
                f = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as e:
                raise ValueError(
                    f"{path} is not a readable safetensors file ({e}); it may be truncated "
                    "or corrupt: copy it again"
                ) from e
            with f:
                for name in f.keys():
                    if not name.endswith(self._IGNORED_SUFFIXES):
                        yield name, (f.get_slice(name) if parts else f.get_tensor(name))

    def load_tokenizer(self) -> Any:
        return hf_tokenizer(self.path)

    def save_tokenizer(self, out_dir: Path) -> None:
        self.load_tokenizer().save_pretrained(str(out_dir))
        for name in self._TOKENIZER_SIDE_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, Path(out_dir) / name)


# (does this path hold the format?, its source), tried in order.
_SOURCES: tuple[tuple[Callable[[Path], bool], Callable[[Path], CheckpointSource]], ...] = (
    (is_gguf_file, GGUFCheckpoint),
    (Path.is_dir, SafetensorsCheckpoint),
)


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` looks like a checkpoint aotllm reads (not an artifact directory)."""
    path = Path(path)
    return is_gguf_file(path) or (path / "config.json").is_file()


def open_checkpoint(path: str | Path | CheckpointSource) -> CheckpointSource:
    """The source for a checkpoint path: a GGUF file or a safetensors directory."""
    if isinstance(path, CheckpointSource):
        return path
    path = Path(path)
    for matches, source in _SOURCES:
        if matches(path):
            return source(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: point `model` at a local Hugging Face checkpoint "
            "directory (config.json, *.safetensors, tokenizer files), a .gguf file, or an "
            "aotllm artifact directory"
        )
    raise ValueError(
        f"{path} is a file but not a GGUF file (it does not start with the GGUF magic); "
        "aotllm reads a Hugging Face checkpoint directory, a llama.cpp .gguf file, or an "
        "aotllm artifact directory"
    )
