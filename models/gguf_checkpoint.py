"""A llama.cpp GGUF file as a checkpoint source.

Config, tokenizer and chat template come from the file's metadata through
transformers' GGUF support, so they match what `from_pretrained(...,
gguf_file=...)` builds (except where models/gguf_archs.py says transformers
gets an architecture's config wrong). Weights are read with the `gguf`
library: each tensor is dequantized to float32 on its own, renamed to its
name in the family's Hugging Face checkpoint, its rows put back where
llama.cpp's converter moved them, and handed to the loader, which casts it
into the model; the file itself stays memory-mapped, so no second copy of the
weights is ever held.

`gguf` and transformers are imported inside the methods that need them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aotllm.models.gguf_archs import ARCHS, GGUFArch, grouped_qkv, unpermute_rotary

GGUF_MAGIC = b"GGUF"

# Tensor types gguf.quants dequantizes that we accept (names of GGMLQuantizationType).
# The exotic ones (IQ*, TQ*, ...) are left out: untested, and slow in numpy.
SUPPORTED_TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)

# Bytes read from each end of the file for the content hash.
_HASH_EDGE = 1 << 20


def is_gguf_file(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


class GGUFCheckpoint:
    """A single .gguf file of a supported architecture."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = None

    def describe(self) -> str:
        return f"GGUF file {self.path}"

    def cache_name(self) -> str:
        return self.path.stem

    def content_hash(self) -> str:
        # Cheap on purpose (a cached start of a multi-GB file must not read it
        # all): size, mtime, and the first and last MiB, which hold the header,
        # metadata and tensor table, and the last tensors' data. A rewrite
        # changes mtime; a copy with a new mtime only costs one recompile.
        st = self.path.stat()
        h = hashlib.sha256(f"gguf:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(self.path, "rb") as f:
            h.update(f.read(_HASH_EDGE))
            f.seek(max(st.st_size - _HASH_EDGE, 0))
            h.update(f.read(_HASH_EDGE))
        return h.hexdigest()

    # -- metadata ---------------------------------------------------------------

    @property
    def reader(self):
        if self._reader is None:
            from gguf import GGUFReader

            try:
                self._reader = GGUFReader(str(self.path))
            except (ValueError, KeyError, IndexError, OSError) as e:
                raise ValueError(
                    f"{self.path} is not a readable GGUF file ({e}); it may be truncated or "
                    "corrupt: download it again"
                ) from e
            splits = self._field("split.count", 1)
            if splits > 1:
                self._reader = None  # refuse it on every call, not just the first
                raise ValueError(
                    f"{self.path} is one of {splits} parts of a split GGUF model; merge the "
                    "parts into one file first (llama.cpp: llama-gguf-split --merge)"
                )
        return self._reader

    def _field(self, key: str, default: Any = None) -> Any:
        """A scalar metadata value (int, float, bool or str), or `default`."""
        from gguf import GGUFValueType

        field = self.reader.fields.get(key)
        if field is None:
            return default
        part = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    def architecture(self) -> GGUFArch:
        arch = self._field("general.architecture")
        if arch not in ARCHS:
            raise ValueError(
                f"{self.path} holds a GGUF model of architecture {arch!r}; aotllm reads GGUF "
                f"architectures {', '.join(sorted(ARCHS))}. Use the model's Hugging "
                "Face safetensors checkpoint instead, if its architecture is supported."
            )
        return ARCHS[arch]

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        # GGUF lists dims fastest-first; torch wants [out, in].
        return {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
                for t in self.reader.tensors}

    def raw_config(self) -> dict[str, Any]:
        from transformers import AutoConfig

        from aotllm.models.registry import architecture_for_model_type

        arch = self.architecture()  # refuse other archs with our message, before transformers'
        if arch.config is not None:
            return arch.config(self._field, self._shapes())
        config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        # transformers' private keys (_name_or_path, ...) are not part of a config.json.
        raw = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        # llama.cpp's converter writes head_dim as key_length, which transformers
        # reads for no dense arch (Qwen3's config class would default it to 128).
        if (head_dim := self._field(f"{arch.name}.attention.key_length")) is not None:
            raw["head_dim"] = head_dim
        # No metadata says whether attention has biases (Llama, Qwen3); the tensors do.
        if "attention_bias" in raw:
            raw["attention_bias"] = "blk.0.attn_q.bias" in self._shapes()
        # A GGUF names no HF class; the model_type transformers derived picks it.
        arch = architecture_for_model_type(raw.get("model_type", ""))
        if arch is not None:
            raw["architectures"] = [arch]
        return raw

    def generation_config(self) -> dict[str, Any]:
        # llama.cpp stops on end-of-turn (eot) and end-of-message (eom) as well as
        # eos; chat models (Llama 3) end their turns with eot, not eos.
        eos = [self._field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(i for i in eos if i is not None))
        gen: dict[str, Any] = {}
        if (bos := self._field("tokenizer.ggml.bos_token_id")) is not None:
            gen["bos_token_id"] = bos
        if eos:
            gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if (pad := self._field("tokenizer.ggml.padding_token_id")) is not None:
            gen["pad_token_id"] = pad
        return gen

    # -- weights ----------------------------------------------------------------

    def _check_tensor_types(self) -> None:
        found = {t.tensor_type.name for t in self.reader.tensors}
        bad = sorted(found - set(SUPPORTED_TENSOR_TYPES))
        if bad:
            raise ValueError(
                f"{self.path} has tensors of type {', '.join(bad)}, which aotllm does not "
                f"dequantize; supported GGUF tensor types: {', '.join(SUPPORTED_TENSOR_TYPES)}. "
                "Use a file quantized to one of those (e.g. Q4_K_M, Q8_0) or the safetensors "
                "checkpoint."
            )

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from gguf.quants import dequantize

        arch = self.architecture()
        n_head = self._field(f"{arch.name}.attention.head_count")
        n_kv = self._field(f"{arch.name}.attention.head_count_kv", n_head)
        shapes = self._shapes()
        self._check_tensor_types()  # all of them, before any work is done
        for t in self.reader.tensors:
            name = arch.hf_name(t.name, shapes)
            if name is None:
                continue
            data = dequantize(t.data, t.tensor_type)
            # F32 comes back as a read-only view of the memory map: copy that one.
            w = torch.from_numpy(np.require(data, np.float32, ["C", "W"])).reshape(shapes[t.name])
            if arch.permuted_qk and ".self_attn.q_proj." in name:
                w = unpermute_rotary(w, n_head)
            elif arch.permuted_qk and ".self_attn.k_proj." in name:
                w = unpermute_rotary(w, n_kv)
            elif arch.contiguous_qkv and ".query_key_value." in name:
                w = grouped_qkv(w, n_head, n_kv)
            yield name, w

    def tensor_parts(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Quantized GGUF blocks dequantize whole tensors: nothing to read in part.
        return self.tensors()

    # -- tokenizer --------------------------------------------------------------

    def load_tokenizer(self) -> Any:
        from aotllm.models.checkpoint import hf_tokenizer

        return hf_tokenizer(self.path.parent, gguf_file=self.path.name)

    def save_tokenizer(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.load_tokenizer().save_pretrained(str(out_dir))
        (out_dir / "generation_config.json").write_text(
            json.dumps(self.generation_config(), indent=2) + "\n"
        )
