"""The artifact manifest: round trip, file checks, runtime compatibility."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest

from aotllm.graphs.buckets import plan_buckets
from aotllm.graphs.file_digest import CHUNK_BYTES, SampleTable, sample_file, sample_ranges
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import (
    FORMAT_VERSION,
    ArtifactError,
    GraphEntry,
    Manifest,
    check_files,
    check_runtime_compat,
    is_artifact_dir,
    sha256_file,
    verify_files,
)

PLAN = plan_buckets(max_model_len=64, max_num_seqs=2, block_size=16)
SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=16, dtype="float32")


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _make_artifact(directory: Path) -> Manifest:
    """A complete artifact with one small fake graph file per bucket."""
    graphs = []
    for bucket in PLAN.buckets:
        rel = f"graphs/{bucket.name}.pt2"
        digest = _write(directory / rel, bucket.name.encode())
        graphs.append(GraphEntry(bucket, rel, digest, compile_seconds=1.5, key="k-" + bucket.name))
    # Large enough that the sampled digest leaves gaps between its chunks.
    weights_sha = _write(directory / "weights.safetensors", bytes(range(256)) * 16384)
    samples = SampleTable({"weights.safetensors": sample_file(directory / "weights.safetensors",
                                                              head_bytes=100)})
    for g in graphs:
        samples.files[g.file] = sample_file(directory / g.file)
    manifest = Manifest(
        model_config={"model_type": "llama", "hidden_size": 16, "rope_scaling": None},
        architecture="LlamaForCausalLM",
        dtype="float32",
        quantization=None,
        backend="aoti",
        backend_version="2.13.0",
        device="cpu",
        torch_version="2.13.0+cpu",
        kv_cache=SPEC.to_dict(),
        plan=PLAN.to_dict(),
        graphs=tuple(graphs),
        weights_sha256=weights_sha,
        file_samples=samples,
        extra={"note": "test"},
    )
    manifest.write(directory)
    return manifest


@pytest.fixture
def artifact(tmp_path: Path) -> tuple[Path, Manifest]:
    return tmp_path, _make_artifact(tmp_path)


def _edit_json(directory: Path, **changes: object) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- round trip --------------------------------------------------------------


def test_round_trip(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    again = Manifest.read(directory)
    assert again == manifest
    # Single-rank artifacts keep format 1 (every aotllm reads them).
    assert again.format_version == 1 < FORMAT_VERSION
    assert again.bucket_plan() == PLAN
    assert again.kv_cache_spec() == SPEC
    bucket = PLAN.decode[-1]
    assert again.graph_for(bucket).file == f"graphs/{bucket.name}.pt2"
    assert is_artifact_dir(directory)
    assert not is_artifact_dir(directory / "graphs")


def test_write_is_pretty_and_leaves_no_temp_files(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    text = (directory / "manifest.json").read_text()
    assert text.startswith('{\n  "format_version": 1,')
    manifest.write(directory)  # overwriting goes through os.replace too
    assert sorted(p.name for p in directory.iterdir()) == [
        "graphs",
        "manifest.json",
        "weights.safetensors",
    ]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10_000  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_construction_rejects_paths_outside_the_artifact() -> None:
    bucket = PLAN.decode[0]
    with pytest.raises(ValueError, match="relative path"):
        GraphEntry(bucket, "../evil.so", "0" * 64, 0.0, "k")
    with pytest.raises(ValueError, match="relative path"):
        GraphEntry(bucket, "/abs/evil.so", "0" * 64, 0.0, "k")
    with pytest.raises(ValueError, match="hex"):
        GraphEntry(bucket, "graphs/x.pt2", "not-a-hash", 0.0, "k")


# -- Manifest.read errors -----------------------------------------------------


def test_read_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest.json not found.*aotllm compile"):
        Manifest.read(tmp_path)


def test_read_bad_json(artifact: tuple[Path, Manifest]) -> None:
    directory, _ = artifact
    (directory / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(ArtifactError, match="not valid JSON.*aotllm compile"):
        Manifest.read(directory)


def test_read_not_an_object(artifact: tuple[Path, Manifest]) -> None:
    directory, _ = artifact
    (directory / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object"):
        Manifest.read(directory)


def test_tp_fields_need_format_2(artifact: tuple[Path, Manifest]) -> None:
    """A runtime from before TP ignores the TP fields, so a TP manifest is
    written as format 2 and a format-1 manifest claiming ranks is refused."""
    directory, manifest = artifact
    sha = "0" * 64
    tp = dataclasses.replace(manifest, tensor_parallel_size=2, distributed_backend="gloo",
                             rank_weights=(("rank1/weights.safetensors", sha),),
                             file_samples=None, format_version=None)
    assert tp.format_version == 2
    assert tp.to_dict()["format_version"] == 2
    _edit_json(directory, tensor_parallel_size=2, distributed_backend="gloo",
               rank_weights=[{"file": "rank1/weights.safetensors", "sha256": sha}])
    with pytest.raises(ArtifactError, match="format version 1 but holds a tensor-parallel"):
        Manifest.read(directory)
    _edit_json(directory, format_version=2, file_samples=None)
    assert Manifest.read(directory).tensor_parallel_size == 2


def test_kernel_libraries_need_format_3(artifact: tuple[Path, Manifest]) -> None:
    """Graphs that call a native kernel library are written as format 3, so a
    runtime that would not load the library refuses them; the library is one
    of the artifact's checked files."""
    directory, manifest = artifact
    sha = "1" * 64
    with_kernels = dataclasses.replace(
        manifest, kernel_libraries=(("kernels/libk.so", sha),), file_samples=None,
        format_version=None)
    assert with_kernels.format_version == 3
    assert ("kernels/libk.so", sha) in with_kernels.files()
    again = Manifest.from_dict(with_kernels.to_dict())
    assert again.kernel_libraries == (("kernels/libk.so", sha),)
    _edit_json(directory, kernel_libraries=[{"file": "kernels/libk.so", "sha256": sha}])
    with pytest.raises(ArtifactError, match="format version 1 but names kernel libraries"):
        Manifest.read(directory)
    _edit_json(directory, kernel_libraries=[{"file": "/abs/libk.so", "sha256": sha}],
               format_version=3, file_samples=None)
    with pytest.raises(ArtifactError, match="kernel library"):
        Manifest.read(directory)


@pytest.mark.parametrize(
    ("version", "match"),
    [
        (FORMAT_VERSION + 1, r"format version 4 but this aotllm reads format versions 1, 2, "
                             r"3.*upgrade"),
        (0, r"format version 0 but this aotllm reads format versions 1, 2, 3.*recompile"),
        ("1", r"format version '1'"),
        (None, r"no format_version"),
    ],
)
def test_read_unknown_format_version(
    artifact: tuple[Path, Manifest], version: object, match: str
) -> None:
    directory, _ = artifact
    _edit_json(directory, format_version=version)
    with pytest.raises(ArtifactError, match=match):
        Manifest.read(directory)


def test_read_missing_field(artifact: tuple[Path, Manifest]) -> None:
    directory, _ = artifact
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    del data["backend"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="missing the field 'backend'"):
        Manifest.read(directory)


def test_read_malformed_plan(artifact: tuple[Path, Manifest]) -> None:
    directory, _ = artifact
    _edit_json(directory, plan={"block_size": 16, "max_model_len": 64, "prefill": [], "decode": []})
    with pytest.raises(ArtifactError, match="malformed.*at least one prefill bucket"):
        Manifest.read(directory)


def test_read_rejects_path_traversal(artifact: tuple[Path, Manifest]) -> None:
    directory, _ = artifact
    _edit_json(directory, weights_file="../../etc/passwd")
    with pytest.raises(ArtifactError, match="relative path inside the artifact"):
        Manifest.read(directory)


# -- verify_files ---------------------------------------------------------------


def test_verify_ok(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    assert verify_files(manifest, directory) is None  # raises on any problem


def test_verify_missing_graph_file(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    victim = manifest.graphs[1].file
    (directory / victim).unlink()
    with pytest.raises(ArtifactError, match=f"missing: {victim}"):
        verify_files(manifest, directory, check_hashes=False)


def test_verify_missing_weights(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    (directory / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing: weights.safetensors"):
        verify_files(manifest, directory)


@pytest.mark.parametrize("target", ["weights.safetensors", "graph"])
def test_verify_hash_mismatch(artifact: tuple[Path, Manifest], target: str) -> None:
    directory, manifest = artifact
    name = manifest.graphs[0].file if target == "graph" else target
    with open(directory / name, "ab") as f:
        f.write(b"!")
    verify_files(manifest, directory, check_hashes=False)  # sizes are not checked
    with pytest.raises(ArtifactError, match=f"{Path(name).name} is corrupted"):
        verify_files(manifest, directory)


def test_verify_bucket_without_graph(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    partial = dataclasses.replace(manifest, graphs=manifest.graphs[:-1])
    with pytest.raises(ArtifactError, match=PLAN.buckets[-1].name):
        verify_files(partial, directory)


# -- check_files: the cheap check on every load -------------------------------------

WEIGHTS = "weights.safetensors"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _unsampled_offset(size: int, head_bytes: int) -> int:
    covered = sample_ranges(size, head_bytes)
    offset = next(o for o in range(0, size, 4096)
                  if not any(start <= o < end for start, end in covered))
    return offset


def test_sample_ranges_cover_head_tail_and_stay_in_bounds() -> None:
    size = 10 * (1 << 20)
    ranges = sample_ranges(size, head_bytes=200_000)
    assert ranges[0] == (0, 200_000)  # a header longer than a chunk is hashed whole
    assert ranges[-1] == (size - CHUNK_BYTES, size)
    assert all(0 <= start < end <= size for start, end in ranges)
    assert sum(end - start for start, end in ranges) < size // 4
    # A file smaller than a chunk is hashed whole.
    assert sample_ranges(1000, head_bytes=0) == [(0, 1000), (1000, 1000)]


def test_check_files_ok(artifact: tuple[Path, Manifest]) -> None:
    directory, manifest = artifact
    assert check_files(manifest, directory) is None  # raises on any problem


def test_check_files_refuses_a_flip_inside_a_sampled_chunk(artifact) -> None:
    directory, manifest = artifact
    size = (directory / WEIGHTS).stat().st_size
    start, end = sample_ranges(size, head_bytes=100)[5]  # a chunk between head and tail
    _flip(directory / WEIGHTS, (start + end) // 2)
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is corrupted") as info:
        check_files(manifest, directory)
    assert f"aotllm verify {directory}" in str(info.value)
    assert "aotllm compile" in str(info.value)


def test_check_files_refuses_a_flip_in_the_header(artifact) -> None:
    directory, manifest = artifact
    _flip(directory / WEIGHTS, 99)  # the last byte of the recorded 100-byte header
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is corrupted"):
        check_files(manifest, directory)


@pytest.mark.parametrize("target", [WEIGHTS, "graph"])
def test_check_files_refuses_a_truncated_file(artifact, target: str) -> None:
    directory, manifest = artifact
    name = manifest.graphs[0].file if target == "graph" else target
    path = directory / name
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="truncated or replaced") as info:
        check_files(manifest, directory)
    assert Path(name).name in str(info.value) and "aotllm verify" in str(info.value)


def test_a_flip_outside_the_samples_passes_the_cheap_check_but_not_verify(artifact) -> None:
    directory, manifest = artifact
    size = (directory / WEIGHTS).stat().st_size
    _flip(directory / WEIGHTS, _unsampled_offset(size, head_bytes=100))
    check_files(manifest, directory)  # the documented blind spot of the cheap check
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is corrupted: its sha256"):
        verify_files(manifest, directory)


def test_verify_names_every_corrupted_file(artifact) -> None:
    directory, manifest = artifact
    for name in (WEIGHTS, manifest.graphs[2].file):
        _flip(directory / name, 0)
    with pytest.raises(ArtifactError) as info:
        verify_files(manifest, directory)
    msg = str(info.value)
    assert f"{WEIGHTS} is corrupted" in msg and f"{manifest.graphs[2].file} is corrupted" in msg


@pytest.mark.parametrize("edit", ["absent", "unknown scheme"])
def test_manifest_without_known_samples_falls_back_to_the_full_hash(artifact, edit, caplog,
                                                                    restore_aotllm_logging):
    # An earlier LLM() in the session may have stopped "aotllm" propagating.
    logging.getLogger("aotllm").addHandler(caplog.handler)
    directory, _ = artifact
    if edit == "absent":  # a manifest written before sampled digests existed
        path = directory / "manifest.json"
        data = json.loads(path.read_text())
        del data["file_samples"]
        path.write_text(json.dumps(data))
    else:
        data = json.loads((directory / "manifest.json").read_text())
        _edit_json(directory, file_samples={**data["file_samples"], "scheme": "newer/9"})
    manifest = Manifest.read(directory)
    with caplog.at_level(logging.WARNING, logger="aotllm"):
        check_files(manifest, directory)
    assert "hashing every file in full" in caplog.text
    size = (directory / WEIGHTS).stat().st_size
    _flip(directory / WEIGHTS, _unsampled_offset(size, head_bytes=100))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS} is corrupted: its sha256"):
        check_files(manifest, directory)


def test_samples_must_cover_every_file(artifact) -> None:
    directory, _ = artifact
    data = json.loads((directory / "manifest.json").read_text())
    del data["file_samples"]["files"][WEIGHTS]
    _edit_json(directory, file_samples=data["file_samples"])
    with pytest.raises(ArtifactError, match=f"malformed.*file_samples lacks {WEIGHTS}"):
        Manifest.read(directory)


# -- check_runtime_compat --------------------------------------------------------


@pytest.mark.parametrize(
    ("torch_version", "device"),
    [("2.13.0+cpu", "cpu"), ("2.13.0", "cpu"), ("2.13.0+cu128", "CPU")],
)
def test_compat_ok(artifact: tuple[Path, Manifest], torch_version: str, device: str) -> None:
    _, manifest = artifact
    check_runtime_compat(
        manifest, torch_version=torch_version, backends={"aoti", "onnx"}, device=device
    )


def test_compat_device_index_is_ignored(artifact: tuple[Path, Manifest]) -> None:
    _, manifest = artifact
    cuda = dataclasses.replace(manifest, device="cuda")
    check_runtime_compat(cuda, torch_version="2.13.0", backends=["aoti"], device="cuda:1")
    cuda0 = dataclasses.replace(manifest, device="cuda:0")
    check_runtime_compat(cuda0, torch_version="2.13.0", backends=["aoti"], device="cuda")


@pytest.mark.parametrize("other", ["2.12.0+cpu", "2.13.1", "2.1.3"])
def test_compat_other_torch(artifact: tuple[Path, Manifest], other: str) -> None:
    _, manifest = artifact
    match = rf"torch 2.13.0\+cpu but this host has torch {re.escape(other)}.*torch==2.13.0"
    with pytest.raises(ArtifactError, match=match):
        check_runtime_compat(manifest, torch_version=other, backends={"aoti"}, device="cpu")


def test_compat_other_backend(artifact: tuple[Path, Manifest]) -> None:
    _, manifest = artifact
    match = "'aoti' backend but this host can load only: onnx, torchair"
    with pytest.raises(ArtifactError, match=match):
        check_runtime_compat(
            manifest, torch_version="2.13.0", backends={"torchair", "onnx"}, device="cpu"
        )


def test_compat_other_device(artifact: tuple[Path, Manifest]) -> None:
    _, manifest = artifact
    with pytest.raises(ArtifactError, match="compiled for device 'cpu' but this runs on 'cuda:0'"):
        check_runtime_compat(manifest, torch_version="2.13.0", backends={"aoti"}, device="cuda:0")


def test_compat_reports_every_problem(artifact: tuple[Path, Manifest]) -> None:
    _, manifest = artifact
    with pytest.raises(ArtifactError) as info:
        check_runtime_compat(manifest, torch_version="2.12.0", backends=(), device="npu:0")
    message = str(info.value)
    assert "torch 2.12.0" in message and "backend" in message and "'npu:0'" in message
