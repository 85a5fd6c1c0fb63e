"""The artifact directory contract: the only thing passed from compile to serve.

An artifact directory holds::

    manifest.json           this module's `Manifest`, as JSON
    weights.safetensors     the weights, stored once and bound to every graph
    graphs/<bucket>.*       one compiled graph per bucket (GE dimension gears: one
                            geared graph that several decode buckets name)
    tokenizer files         copied from the checkpoint

Paths in the manifest are relative to the artifact directory, with ``/``
separators, so an artifact can be moved or copied whole.

Loading refuses an artifact that does not fit this host (`check_runtime_compat`)
or whose files are missing or visibly damaged (`check_files`: sizes and sampled
digests, graphs/file_digest.py), with an `ArtifactError` that says what to do.
`verify_files` hashes every file in full (`aotllm verify`). Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from aotllm.graphs.buckets import Bucket, BucketPlan
from aotllm.graphs.devices import device_type
from aotllm.graphs.file_digest import SampleTable, sampled_sha256
from aotllm.graphs.kv_cache import KVCacheSpec

# Format 2 is format 1 plus tensor parallelism (`tensor_parallel_size`,
# `distributed_backend`, `rank_weights`). A single-rank artifact is still
# written as format 1, which every aotllm reads; a TP artifact is written as 2,
# so a runtime from before TP refuses it instead of loading rank 0's weights
# as if they were the whole model. Format 3 adds `kernel_libraries`: native
# code the graphs call, which a runtime from before it would not load (its
# graphs would fail to resolve the kernel's symbol).
FORMAT_VERSION = 3
TP_FORMAT_VERSION = 2
KERNELS_FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"
GRAPHS_DIR = "graphs"

# Every tensor in the weights file starts at a multiple of this many bytes
# from the file's start, so the views of a (page-aligned) memory map are as
# aligned as oneDNN wants its matmul operands; the gaps are filler tensors
# named WEIGHTS_PAD_PREFIX + n (safetensors allows no holes), which loading skips.
WEIGHTS_ALIGNMENT = 64
WEIGHTS_PAD_PREFIX = "__aotllm_pad_"

# The tokenizer as the `tokenizers` library alone runs it (compiler/
# tokenizer_snapshot.py), named by extra["runtime_tokenizer"]["file"].
RUNTIME_TOKENIZER_FILE = "runtime_tokenizer.json"

_RECOMPILE = "recompile the model with `aotllm compile`"
_VERIFY = "`aotllm verify {}` hashes every file in full and names the damaged ones"

logger = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Exception):
    """An artifact directory cannot be used; the message says why and what to do."""


def _check_relative(path: str, what: str) -> str:
    # A manifest is untrusted input: its paths must stay inside the artifact.
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path:
        raise ValueError(f"{what} must be a relative path inside the artifact, got {path!r}")
    return path


def _check_sha256(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"{what} must be 64 lowercase hex digits, got {value!r}")
    return value


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class BackendTraits:
    """What holds for one backend's graphs; the runtime sizes and binds by it."""

    # The graphs write the new K/V into the cache tensors they are given
    # (Inductor, GE). False: the caches are graph outputs the loader must
    # alias back onto its own tensors (ONNX).
    kv_in_place: bool = True
    # None: num_blocks is a dynamic dimension and the serving host sizes the
    # cache from its memory. A number: the graphs were built for exactly this
    # many blocks (GE and ATC need fully static shapes).
    num_blocks: int | None = None
    # The weights file is bound to every graph at load time (one copy in memory).
    shared_weights: bool = True

    def __post_init__(self) -> None:
        if self.num_blocks is not None and (type(self.num_blocks) is not int or self.num_blocks < 2):
            raise ValueError(f"backend_traits.num_blocks must be None or an int >= 2, "
                             f"got {self.num_blocks!r}")

    def to_dict(self) -> dict:
        return {"kv_in_place": self.kv_in_place, "num_blocks": self.num_blocks,
                "shared_weights": self.shared_weights}

    @classmethod
    def from_dict(cls, d: dict) -> "BackendTraits":
        return cls(kv_in_place=bool(d["kv_in_place"]), num_blocks=d["num_blocks"],
                   shared_weights=bool(d["shared_weights"]))


@dataclass(frozen=True)
class GraphEntry:
    bucket: Bucket
    file: str  # relative to the artifact directory, e.g. "graphs/decode_b8_t1_c16.pt2"
    sha256: str
    compile_seconds: float
    # Content hash of everything that produced this graph, so a recompile can
    # reuse it when nothing changed.
    key: str

    def __post_init__(self) -> None:
        _check_relative(self.file, f"graph file of {self.bucket.name}")
        _check_sha256(self.sha256, f"sha256 of {self.file}")

    def to_dict(self) -> dict:
        return {
            "bucket": self.bucket.to_dict(),
            "file": self.file,
            "sha256": self.sha256,
            "compile_seconds": self.compile_seconds,
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GraphEntry":
        return cls(
            bucket=Bucket.from_dict(d["bucket"]),
            file=str(d["file"]),
            sha256=str(d["sha256"]),
            compile_seconds=float(d["compile_seconds"]),
            key=str(d["key"]),
        )


@dataclass(frozen=True)
class Manifest:
    model_config: dict  # the checkpoint's config.json content
    architecture: str  # e.g. "LlamaForCausalLM"
    dtype: str  # torch dtype name without "torch."
    # None, or quantize/'s record: scheme, group size, float modules,
    # calibration summary, the int8 kernel per bucket.
    quantization: dict | None
    backend: str
    backend_version: str
    device: str  # what it was compiled for, e.g. "cpu", "cuda", "npu"
    torch_version: str
    kv_cache: dict  # KVCacheSpec.to_dict()
    plan: dict  # BucketPlan.to_dict()
    graphs: tuple[GraphEntry, ...]
    weights_sha256: str
    weights_file: str = "weights.safetensors"
    backend_traits: BackendTraits = BackendTraits()
    created_at: str = field(default_factory=_utc_now)
    extra: dict = field(default_factory=dict)
    # Size and sampled digest of every file, for the cheap check on each load
    # (graphs/file_digest.py). None in manifests written before it existed:
    # those are checked by their full sha256 instead.
    file_samples: SampleTable | None = None
    # Tensor parallelism: the graphs are the same on every rank (a rank's
    # slices and offsets are weights, bound at load), each rank has its own
    # weights file: rank 0's is `weights_file`, ranks 1.. are `rank_weights`
    # as (file, sha256). The collectives inside the graphs run over
    # `distributed_backend` (gloo, nccl, hccl).
    tensor_parallel_size: int = 1
    distributed_backend: str | None = None
    rank_weights: tuple[tuple[str, str], ...] = ()
    # Native libraries the graphs' code calls, as (file, sha256): the runtime
    # loads them before the graphs (models/compact_linear.py).
    kernel_libraries: tuple[tuple[str, str], ...] = ()
    # None: the lowest version that describes this manifest (see FORMAT_VERSION).
    format_version: int | None = None

    def __post_init__(self) -> None:
        if self.format_version is None:
            object.__setattr__(
                self, "format_version",
                KERNELS_FORMAT_VERSION if self.kernel_libraries
                else TP_FORMAT_VERSION if self.tensor_parallel_size > 1 else 1)
        object.__setattr__(self, "graphs", tuple(self.graphs))
        object.__setattr__(self, "rank_weights", tuple(tuple(w) for w in self.rank_weights))
        object.__setattr__(self, "kernel_libraries",
                           tuple(tuple(k) for k in self.kernel_libraries))
        for file, digest in self.kernel_libraries:
            _check_relative(file, "kernel library")
            _check_sha256(digest, f"sha256 of {file}")
        if type(self.tensor_parallel_size) is not int or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got "
                             f"{self.tensor_parallel_size!r}")
        if len(self.rank_weights) != self.tensor_parallel_size - 1:
            raise ValueError(f"{len(self.rank_weights)} rank weights files for "
                             f"tensor_parallel_size {self.tensor_parallel_size}")
        for rank, (file, digest) in enumerate(self.rank_weights, 1):
            _check_relative(file, f"weights file of rank {rank}")
            _check_sha256(digest, f"sha256 of {file}")
        _check_relative(self.weights_file, "weights_file")
        _check_sha256(self.weights_sha256, f"sha256 of {self.weights_file}")
        if self.file_samples is not None:
            unsampled = [name for name, _ in self.files() if name not in self.file_samples.files]
            if unsampled:
                raise ValueError(f"file_samples lacks {', '.join(unsampled)}")
        # Fail at construction (and so at read time), not halfway through loading.
        self.bucket_plan()
        self.kv_cache_spec()

    def bucket_plan(self) -> BucketPlan:
        return BucketPlan.from_dict(self.plan)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec.from_dict(self.kv_cache)

    def files(self) -> list[tuple[str, str]]:
        """(relative path, sha256) of the weights file and every graph file, once each."""
        # Buckets may share one graph file (GE dimension gears).
        return list(dict.fromkeys([(self.weights_file, self.weights_sha256),
                                   *self.rank_weights,
                                   *((g.file, g.sha256) for g in self.graphs),
                                   *self.kernel_libraries]))

    def weights_for_rank(self, rank: int) -> tuple[str, str]:
        """(weights file, sha256) of one tensor-parallel rank."""
        if not 0 <= rank < self.tensor_parallel_size:
            raise ValueError(f"rank {rank} of an artifact with tensor_parallel_size "
                             f"{self.tensor_parallel_size}")
        return (self.weights_file, self.weights_sha256) if rank == 0 else \
            self.rank_weights[rank - 1]

    def graph_for(self, bucket: Bucket) -> GraphEntry:
        for entry in self.graphs:
            if entry.bucket == bucket:
                return entry
        raise KeyError(f"the manifest has no graph for bucket {bucket.name}")

    def to_dict(self) -> dict:
        # format_version first so a reader (or a person) sees it at the top.
        return {
            "format_version": self.format_version,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "backend_traits": self.backend_traits.to_dict(),
            "device": self.device,
            "torch_version": self.torch_version,
            "created_at": self.created_at,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "kv_cache": self.kv_cache,
            "plan": self.plan,
            "file_samples": None if self.file_samples is None else self.file_samples.to_dict(),
            "tensor_parallel_size": self.tensor_parallel_size,
            "distributed_backend": self.distributed_backend,
            "rank_weights": [{"file": f, "sha256": h} for f, h in self.rank_weights],
            "kernel_libraries": [{"file": f, "sha256": h} for f, h in self.kernel_libraries],
            "graphs": [g.to_dict() for g in self.graphs],
            "model_config": self.model_config,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        """Raises ArtifactError for another format version, KeyError/TypeError/ValueError
        for a malformed dict."""
        version = d.get("format_version")
        if type(version) is not int or version not in READABLE_FORMAT_VERSIONS:
            raise ArtifactError(_version_message(version))
        if version < KERNELS_FORMAT_VERSION and d.get("kernel_libraries"):
            raise ArtifactError(f"the manifest says format version {version} but names "
                                f"kernel libraries (format {KERNELS_FORMAT_VERSION}); "
                                f"{_RECOMPILE}")
        if version < TP_FORMAT_VERSION and d.get("tensor_parallel_size", 1) != 1:
            raise ArtifactError(f"the manifest says format version {version} but holds a "
                                f"tensor-parallel artifact (format {TP_FORMAT_VERSION}); "
                                f"{_RECOMPILE}")
        return cls(
            model_config=dict(d["model_config"]),
            architecture=str(d["architecture"]),
            dtype=str(d["dtype"]),
            quantization=None if d["quantization"] is None else dict(d["quantization"]),
            backend=str(d["backend"]),
            backend_version=str(d["backend_version"]),
            # Absent in manifests written before backends declared traits:
            # those were all Inductor artifacts, whose traits are the defaults.
            backend_traits=BackendTraits.from_dict(d["backend_traits"])
            if "backend_traits" in d else BackendTraits(),
            device=str(d["device"]),
            torch_version=str(d["torch_version"]),
            kv_cache=dict(d["kv_cache"]),
            plan=dict(d["plan"]),
            graphs=tuple(GraphEntry.from_dict(g) for g in d["graphs"]),
            weights_file=str(d.get("weights_file", "weights.safetensors")),
            weights_sha256=str(d["weights_sha256"]),
            created_at=str(d["created_at"]),
            extra=dict(d.get("extra", {})),
            file_samples=None if d.get("file_samples") is None
            else SampleTable.from_dict(d["file_samples"]),
            # Absent before tensor parallelism: one rank.
            tensor_parallel_size=d.get("tensor_parallel_size", 1),
            distributed_backend=d.get("distributed_backend"),
            rank_weights=tuple((str(w["file"]), str(w["sha256"]))
                               for w in d.get("rank_weights", ())),
            kernel_libraries=tuple((str(k["file"]), str(k["sha256"]))
                                   for k in d.get("kernel_libraries", ())),
            format_version=version,
        )

    def write(self, artifact_dir: str | os.PathLike[str]) -> Path:
        """Write manifest.json atomically: a reader sees the old file or the new one."""
        directory = Path(artifact_dir)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            target = directory / MANIFEST_FILE
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def read(cls, artifact_dir: str | os.PathLike[str]) -> "Manifest":
        path = Path(artifact_dir) / MANIFEST_FILE
        if not path.is_file():
            raise ArtifactError(
                f"{artifact_dir} is not an aotllm artifact: {MANIFEST_FILE} not found. "
                f"Pass the directory `aotllm compile` wrote, or compile one with `aotllm compile`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(
                f"{path} is not valid JSON ({e}); the artifact is damaged or was copied "
                f"incompletely. Copy it again or {_RECOMPILE}"
            ) from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{path} does not hold a JSON object; {_RECOMPILE}")
        try:
            return cls.from_dict(data)
        except ArtifactError as e:
            raise ArtifactError(f"{path}: {e}") from None
        except KeyError as e:
            raise ArtifactError(f"{path} is missing the field {e}; {_RECOMPILE}") from None
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{path} is malformed ({e}); {_RECOMPILE}") from None


def _version_message(version: object) -> str:
    if version is None:
        return f"the manifest has no format_version; it was not written by aotllm. {_RECOMPILE}"
    if type(version) is int and version > FORMAT_VERSION:
        hint = "it was written by a newer aotllm: upgrade aotllm, or " + _RECOMPILE
    else:
        hint = _RECOMPILE + " from this aotllm"
    return (
        f"the artifact has format version {version!r} but this aotllm reads format "
        f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}; {hint}"
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks (weights files are many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_complete(manifest: Manifest, directory: Path) -> None:
    """Every planned bucket has a graph and every file exists."""
    planned = set(manifest.bucket_plan().buckets)
    missing_graphs = sorted(b.name for b in planned - {g.bucket for g in manifest.graphs})
    if missing_graphs:
        raise ArtifactError(
            f"the manifest in {directory} has no graph for buckets {missing_graphs}; "
            f"the compile did not finish. {_RECOMPILE}"
        )
    missing = [name for name, _ in manifest.files() if not (directory / name).is_file()]
    if missing:
        raise ArtifactError(
            f"the artifact in {directory} is incomplete, missing: {', '.join(missing)}. "
            f"Copy the whole artifact directory again or {_RECOMPILE}"
        )


def check_files(manifest: Manifest, artifact_dir: str | os.PathLike[str]) -> None:
    """The check on every load: each file exists, has its recorded size and its
    sampled digest (a few MiB read per file, not every byte).

    A manifest without sampled digests (older aotllm), or with a sampling rule
    this aotllm does not know, is checked by the full sha256 instead.
    """
    directory = Path(artifact_dir)
    _check_complete(manifest, directory)
    table = manifest.file_samples
    if table is None or not table.known_scheme:
        why = ("has no sampled digests" if table is None
               else f"uses the sampling rule {table.scheme!r}, unknown to this aotllm")
        logger.warning("The manifest in %s %s: hashing every file in full, which slows "
                       "every load; %s to load without it", directory, why, _RECOMPILE)
        verify_files(manifest, directory)
        return
    for name, _ in manifest.files():
        sample = table.files[name]
        path = directory / name
        size = path.stat().st_size
        if size != sample.size:
            raise ArtifactError(
                f"{path} is {size} bytes but the manifest expects {sample.size}: it was "
                f"truncated or replaced. Copy the artifact again or {_RECOMPILE}; "
                + _VERIFY.format(directory)
            )
        actual = sampled_sha256(path, size, sample.head_bytes, table.chunk_bytes, table.chunks)
        if actual != sample.sha256:
            raise ArtifactError(
                f"{path} is corrupted: its sampled digest (size, header and "
                f"{table.chunks} chunks) does not match the manifest. Copy the artifact "
                f"again or {_RECOMPILE}; " + _VERIFY.format(directory)
            )


def verify_files(
    manifest: Manifest, artifact_dir: str | os.PathLike[str], check_hashes: bool = True
) -> None:
    """Check that every bucket has a graph and every file exists and (with
    `check_hashes`) matches its full sha256; the error names every damaged file."""
    directory = Path(artifact_dir)
    _check_complete(manifest, directory)
    if not check_hashes:
        return
    damaged = []
    for name, expected in manifest.files():
        actual = sha256_file(directory / name)
        if actual != expected:
            damaged.append(f"{directory / name} is corrupted: its sha256 is {actual}, the "
                           f"manifest expects {expected}")
    if damaged:
        raise ArtifactError(f"{'; '.join(damaged)}. Copy the artifact again or {_RECOMPILE}")


def _release(version: str) -> tuple[int, ...]:
    """The release part of a version ("2.13.0+cpu" and "2.13.0.dev1" -> (2, 13, 0))."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("vV"))
    if not match:
        return ()
    parts = [int(p) for p in match.group().split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def check_runtime_compat(
    manifest: Manifest, *, torch_version: str, backends: Collection[str], device: str,
    quantization_schemes: Collection[str] = (),
) -> None:
    """Raise ArtifactError unless this host can run the artifact's graphs.

    Compiled graphs only load under the torch release that built them; the
    local suffix (+cpu, +cu128) is ignored. A device index does not matter:
    an artifact compiled for "cuda" runs on "cuda:1".
    """
    problems = []
    built, here = _release(manifest.torch_version), _release(torch_version)
    if not built or built != here:
        problems.append(
            f"it was compiled with torch {manifest.torch_version} but this host has torch "
            f"{torch_version}: install torch=={manifest.torch_version.split('+')[0]} or "
            f"{_RECOMPILE} under this torch"
        )
    if manifest.backend not in backends:
        available = ", ".join(sorted(backends)) or "none"
        problems.append(
            f"it was compiled for the {manifest.backend!r} backend but this host can load "
            f"only: {available}. Install that backend's runtime or {_RECOMPILE} for one "
            f"of these backends"
        )
    if device_type(manifest.device) != device_type(device):
        problems.append(
            f"it was compiled for device {manifest.device!r} but this runs on {device!r}: "
            f"{_RECOMPILE} for {device_type(device)!r}, or serve it on a "
            f"{device_type(manifest.device)!r} host"
        )
    scheme = (manifest.quantization or {}).get("scheme")
    if scheme is not None and scheme not in quantization_schemes:
        known = ", ".join(sorted(quantization_schemes)) or "none"
        problems.append(
            f"its linears are quantized as {scheme!r}, which this aotllm has no kernels for "
            f"(it runs: {known}); upgrade aotllm or {_RECOMPILE} with one of those schemes"
        )
    if problems:
        raise ArtifactError("this artifact cannot run here: " + "; ".join(problems))


def check_world_size(manifest: Manifest, world_size: int) -> None:
    """Refuse to serve a tensor-parallel artifact with another number of ranks:
    each rank's weights file holds only its slices."""
    tp = manifest.tensor_parallel_size
    if world_size == tp:
        return
    if tp == 1:
        raise ArtifactError(
            f"this artifact was compiled for one process (tensor_parallel_size 1) but "
            f"{world_size} ranks are loading it: serve it with tensor_parallel_size=1, or "
            f"{_RECOMPILE} --tensor-parallel-size {world_size}")
    raise ArtifactError(
        f"this artifact is split across {tp} ranks (tensor_parallel_size {tp}) but "
        f"{world_size} {'process is' if world_size == 1 else 'ranks are'} loading it: load "
        f"it through LLM(...) or `aotllm serve` (they start one process per rank), launch "
        f"{tp} ranks (torchrun --nproc-per-node {tp}) whose programs create LLM(...), "
        f"or {_RECOMPILE} --tensor-parallel-size {world_size}")


def is_artifact_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()
