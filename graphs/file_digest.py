"""Sampled digests: the cheap check of an artifact's files on every load.

Hashing a weights file in full costs a read of every byte (0.55 s for 250 MB
here, minutes for a large model), on every start of a server. What a load
needs to catch is the common damage: a truncated or partial copy, a file
replaced by another, a corrupted header. So the compiler records per file its
size and a sha256 over

    the size, the first `head_bytes` (for safetensors: its whole JSON header),
    the last `chunk_bytes`, and `chunks` chunks of `chunk_bytes` spread evenly
    between them,

and a load compares those: about 2 MiB read per file. A flipped byte outside
the sampled chunks goes unseen; `aotllm verify` hashes every file in full
(`verify_files` in graphs/manifest.py). Stdlib only.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

# The name of the sampling rule below. A manifest naming another scheme (a
# newer aotllm's) is checked by the full hash instead.
SCHEME = "sha256-size-head-tail-strided/1"
CHUNK_BYTES = 1 << 16
CHUNKS = 32

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileSample:
    """One file's size and sampled digest, as the manifest records them."""

    size: int
    head_bytes: int  # leading bytes hashed whole (a safetensors header, at least)
    sha256: str

    def __post_init__(self) -> None:
        for name in ("size", "head_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"file sample {name} must be an int >= 0, got {value!r}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"file sample sha256 must be 64 lowercase hex digits, "
                             f"got {self.sha256!r}")

    def to_dict(self) -> dict:
        return {"size": self.size, "head_bytes": self.head_bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "FileSample":
        return cls(size=d["size"], head_bytes=d["head_bytes"], sha256=d["sha256"])


@dataclass(frozen=True)
class SampleTable:
    """The manifest's `file_samples`: the rule's parameters and every file's sample.

    JSON: {"scheme": SCHEME, "chunk_bytes": 65536, "chunks": 32,
           "files": {"weights.safetensors": {"size", "head_bytes", "sha256"}, ...}}
    """

    files: dict[str, FileSample]
    scheme: str = SCHEME
    chunk_bytes: int = CHUNK_BYTES
    chunks: int = CHUNKS

    def __post_init__(self) -> None:
        if type(self.chunk_bytes) is not int or self.chunk_bytes < 1:
            raise ValueError(f"file_samples.chunk_bytes must be an int >= 1, "
                             f"got {self.chunk_bytes!r}")
        if type(self.chunks) is not int or self.chunks < 0:
            raise ValueError(f"file_samples.chunks must be an int >= 0, got {self.chunks!r}")

    @property
    def known_scheme(self) -> bool:
        return self.scheme == SCHEME

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "chunk_bytes": self.chunk_bytes, "chunks": self.chunks,
                "files": {name: s.to_dict() for name, s in self.files.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "SampleTable":
        return cls(files={str(k): FileSample.from_dict(v) for k, v in d["files"].items()},
                   scheme=str(d["scheme"]), chunk_bytes=d["chunk_bytes"], chunks=d["chunks"])


def sample_ranges(size: int, head_bytes: int, chunk_bytes: int = CHUNK_BYTES,
                  chunks: int = CHUNKS) -> list[tuple[int, int]]:
    """The [start, end) byte ranges a sampled digest covers, in hashing order."""
    head = min(size, max(head_bytes, chunk_bytes))
    tail_start = max(head, size - chunk_bytes)
    ranges = [(0, head)]
    # Evenly spaced over the bytes between the head and the tail.
    span = tail_start - head
    if span > 0:
        for i in range(chunks):
            start = head + span * (i + 1) // (chunks + 1)
            ranges.append((start, min(start + chunk_bytes, tail_start)))
    ranges.append((tail_start, size))
    return ranges


def sampled_sha256(path: str | os.PathLike[str], size: int, head_bytes: int,
                   chunk_bytes: int = CHUNK_BYTES, chunks: int = CHUNKS) -> str:
    """The sampled digest of a file assumed to be `size` bytes long (the caller
    compares sizes first: a shorter file reads short and hashes differently)."""
    digest = hashlib.sha256(SCHEME.encode())
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for start, end in sample_ranges(size, head_bytes, chunk_bytes, chunks):
            f.seek(start)
            digest.update(f.read(end - start))
    return digest.hexdigest()


def safetensors_header_bytes(path: str | os.PathLike[str]) -> int:
    """8 + the JSON header length of a safetensors file (0 if it is not one):
    the bytes that say where every tensor lies, hashed whole."""
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        return 0
    n = int.from_bytes(prefix, "little")
    return 8 + n if 8 + n <= os.path.getsize(path) else 0


def sample_file(path: str | os.PathLike[str], head_bytes: int = 0) -> FileSample:
    """The compile-time record of one file."""
    size = os.path.getsize(path)
    return FileSample(size, head_bytes, sampled_sha256(path, size, head_bytes))
