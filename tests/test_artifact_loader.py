"""Loading refuses an artifact that cannot run here, and says what to do about it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from aotllm import LLM
from aotllm.graphs.manifest import MANIFEST_FILE, ArtifactError, Manifest
from aotllm.runtime.artifact import load_artifact

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shared(artifacts) -> Path:
    return artifacts.get("llama-gqa", "float32")


@pytest.fixture
def artifact(shared, tmp_path) -> Path:
    """A private copy: tests damage it, the shared one stays intact."""
    return Path(shutil.copytree(shared, tmp_path / "artifact"))


def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    manifest = path / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))


def _refusal(path: Path) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(path, CPU)
    return str(info.value)


def test_an_intact_copy_loads(artifact):
    loaded = load_artifact(artifact, CPU)
    assert set(loaded.graphs) == set(loaded.plan.buckets)


def test_newer_format_version_asks_to_upgrade(artifact):
    _edit_manifest(artifact, lambda d: d.update(format_version=d["format_version"] + 1))
    msg = _refusal(artifact)
    assert "format version" in msg and "upgrade aotllm" in msg


def test_corrupted_graph_file_is_named(artifact):
    entry = Manifest.read(artifact).graphs[0]
    path = artifact / entry.file
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    path.write_bytes(bytes(data))
    msg = _refusal(artifact)
    assert "corrupted" in msg and Path(entry.file).name in msg
    assert "aotllm compile" in msg


def test_missing_graph_file_is_named(artifact):
    entry = Manifest.read(artifact).graphs[-1]
    (artifact / entry.file).unlink()
    msg = _refusal(artifact)
    assert "missing" in msg and entry.file in msg


def test_missing_weights_file_is_named(artifact):
    (artifact / "weights.safetensors").unlink()
    msg = _refusal(artifact)
    assert "missing" in msg and "weights.safetensors" in msg
    assert "Copy the whole artifact directory again" in msg


def test_unknown_backend_names_the_available_ones(artifact):
    _edit_manifest(artifact, lambda d: d.update(backend="torchair"))
    msg = _refusal(artifact)
    assert "'torchair' backend" in msg and "inductor" in msg


def test_other_torch_version_says_which_to_install(artifact):
    _edit_manifest(artifact, lambda d: d.update(torch_version="2.1.0+cu121"))
    msg = _refusal(artifact)
    assert "torch 2.1.0+cu121" in msg and "install torch==2.1.0" in msg


def test_local_torch_suffix_does_not_matter(artifact):
    release = torch.__version__.split("+")[0]
    _edit_manifest(artifact, lambda d: d.update(torch_version=release + "+cu999"))
    loaded = load_artifact(artifact, CPU)
    assert set(loaded.graphs) == set(loaded.plan.buckets)


def test_other_device_is_refused_before_loading(artifact):
    _edit_manifest(artifact, lambda d: d.update(device="npu"))
    msg = _refusal(artifact)
    assert "device 'npu'" in msg and "'cpu'" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_artifact_on_cpu_only_host_says_so(artifact):
    # device="auto" follows the manifest; with no GPU here the refusal must
    # name the device mismatch, not blame the weights file.
    _edit_manifest(artifact, lambda d: d.update(device="cuda"))
    with pytest.raises((ArtifactError, ValueError)) as info:
        LLM(str(artifact))
    msg = str(info.value)
    assert "cannot read" not in msg, msg
    assert "cuda" in msg.lower() and "cpu" in msg


def test_cuda_artifact_with_device_cpu_is_refused(artifact):
    _edit_manifest(artifact, lambda d: d.update(device="cuda"))
    with pytest.raises(ArtifactError, match="compiled for device 'cuda'"):
        LLM(str(artifact), device="cpu")


def test_dtype_other_than_the_artifacts_is_a_value_error(shared):
    with pytest.raises(ValueError, match="compiled for dtype float32.*recompile with --dtype"):
        LLM(str(shared), dtype="bfloat16")


def test_dtype_alias_of_the_artifacts_dtype_is_accepted(shared):
    # vLLM's "float" is float32 (the eager path accepts it too).
    llm = LLM(str(shared), dtype="float")
    assert all(kv.dtype == torch.float32 for kv in llm.llm_engine.runner.kv_caches)


def test_block_size_other_than_the_artifacts_is_a_value_error(shared):
    with pytest.raises(ValueError, match="compiled with block_size 16.*--block-size 32"):
        LLM(str(shared), block_size=32)


def test_max_model_len_above_the_artifacts_is_a_value_error(shared):
    with pytest.raises(ValueError, match="exceeds the artifact's 128.*--max-model-len 256"):
        LLM(str(shared), max_model_len=256)
