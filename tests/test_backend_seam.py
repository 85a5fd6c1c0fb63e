"""The backend seam: registries on both halves, per-backend traits in the
manifest, a fixed KV block count honoured at load, and device names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aotllm import LLM
from aotllm.compiler.backends import get_backend
from aotllm.compiler.config import CompileConfig
from aotllm.graphs.devices import DISTRIBUTED_BACKENDS, supported_device_type
from aotllm.graphs.manifest import MANIFEST_FILE, ArtifactError, BackendTraits, Manifest
from aotllm.runtime.devices import resolve_device
from aotllm.runtime.graph_loaders import get_loader


def test_traits_round_trip_and_validate():
    t = BackendTraits(kv_in_place=False, num_blocks=40, shared_weights=True)
    assert BackendTraits.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="num_blocks"):
        BackendTraits(num_blocks=1)
    with pytest.raises(ValueError, match="num_blocks"):
        BackendTraits.from_dict({"kv_in_place": True, "num_blocks": "8", "shared_weights": True})


def test_unknown_backend_names_the_known_ones(llama_dir):
    with pytest.raises(ValueError, match="unknown compiler backend 'tvm'.*inductor"):
        get_backend(CompileConfig(model=str(llama_dir), output="x", backend="tvm"))
    with pytest.raises(ArtifactError, match="no loader for 'tvm'.*inductor"):
        get_loader("tvm")


def test_inductor_refuses_an_npu_target(llama_dir):
    with pytest.raises(ValueError, match="--backend ge"):
        get_backend(CompileConfig(model=str(llama_dir), output="x", device="npu"))


@pytest.mark.parametrize("option", [{"compile_workers": 2}, {"tensor_parallel_size": 2}])
def test_cuda_compiles_refuse_forked_workers(option):
    """Workers fork after the model is on the target device, and a forked
    child cannot use CUDA once its parent has: refused up front, not a crash
    in every worker."""
    with pytest.raises(ValueError, match="cannot use CUDA"):
        CompileConfig(model="m", output="x", device="cuda:0", **option)
    CompileConfig(model="m", output="x", device="cpu", **option)  # the CPU forks fine


def test_device_names():
    assert supported_device_type("npu:1") == "npu"
    assert DISTRIBUTED_BACKENDS["npu"] == "hccl"
    with pytest.raises(ValueError, match="cpu, cuda, npu"):
        supported_device_type("tpu")
    # This host has no torch_npu/CANN: asking for an NPU says so.
    with pytest.raises(ValueError, match="torch_npu"):
        resolve_device("npu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_fixed_block_count_is_what_the_runtime_allocates(artifacts, tmp_path):
    """An artifact whose graphs were built for N blocks (GE, ONNX for ATC) gets
    exactly N, and a conflicting override is refused with a message."""
    art = Path(shutil.copytree(artifacts.get("llama-gqa", "float32"), tmp_path / "a"))
    manifest = art / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    # Written by this compiler: Inductor's traits.
    assert data["backend_traits"] == {"kv_in_place": True, "num_blocks": None,
                                      "shared_weights": True}
    data["backend_traits"]["num_blocks"] = 23
    manifest.write_text(json.dumps(data))
    assert Manifest.read(art).backend_traits.num_blocks == 23

    llm = LLM(str(art))
    assert llm.llm_engine.runner.kv_caches[0].shape[1] == 23
    with pytest.raises(ValueError, match="exactly 23 KV blocks"):
        LLM(str(art), num_gpu_blocks_override=40)


def test_manifest_without_traits_reads_as_inductor(artifacts, tmp_path):
    art = Path(shutil.copytree(artifacts.get("llama-gqa", "float32"), tmp_path / "a"))
    data = json.loads((art / MANIFEST_FILE).read_text())
    del data["backend_traits"]
    (art / MANIFEST_FILE).write_text(json.dumps(data))
    assert Manifest.read(art).backend_traits == BackendTraits()
