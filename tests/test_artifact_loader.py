"""Loading refuses an artifact that cannot run here, and says what to do about it."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import save_file

from aotllm import LLM, SamplingParams
from aotllm.graphs.file_digest import sample_ranges
from aotllm.graphs.manifest import (
    MANIFEST_FILE,
    WEIGHTS_ALIGNMENT,
    WEIGHTS_PAD_PREFIX,
    ArtifactError,
    Manifest,
    sha256_file,
)
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
    from aotllm.graphs.manifest import FORMAT_VERSION

    _edit_manifest(artifact, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    msg = _refusal(artifact)
    assert "format version" in msg and "upgrade aotllm" in msg


def _flip_sampled_byte(artifact: Path, name: str) -> None:
    """Flips a byte in the middle of a chunk the load-time check samples."""
    path = artifact / name
    sample = Manifest.read(artifact).file_samples.files[name]
    ranges = [r for r in sample_ranges(sample.size, sample.head_bytes) if r[1] > r[0]]
    start, end = ranges[len(ranges) // 2]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_graph_file_is_named(artifact):
    entry = Manifest.read(artifact).graphs[0]
    _flip_sampled_byte(artifact, entry.file)
    msg = _refusal(artifact)
    assert "corrupted" in msg and Path(entry.file).name in msg
    assert "aotllm compile" in msg and "aotllm verify" in msg


def test_corrupted_weights_are_refused_by_the_cheap_check(artifact):
    _flip_sampled_byte(artifact, "weights.safetensors")
    msg = _refusal(artifact)
    assert "weights.safetensors is corrupted" in msg and "aotllm verify" in msg


def test_corrupted_kernel_library_is_refused(artifact):
    (library, _), = Manifest.read(artifact).kernel_libraries
    _flip_sampled_byte(artifact, library)
    msg = _refusal(artifact)
    assert "corrupted" in msg and Path(library).name in msg and "aotllm verify" in msg


def test_kernel_library_that_does_not_load_asks_to_recompile(artifact, monkeypatch):
    from aotllm.models import compact_linear

    def fail(path):
        raise OSError(f"{path}: wrong ELF class")

    monkeypatch.setattr(compact_linear, "load_library", fail)
    msg = _refusal(artifact)
    assert "cannot load the kernel library" in msg and "wrong ELF class" in msg
    assert "aotllm compile" in msg


def test_truncated_weights_are_refused(artifact):
    path = artifact / "weights.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    msg = _refusal(artifact)
    assert "weights.safetensors is" in msg and "truncated" in msg and "aotllm verify" in msg


def test_weights_are_mapped_not_copied(artifact):
    """Every weight is a view into the mapped weights file, aligned for oneDNN."""
    loaded = load_artifact(artifact, CPU)
    weights_path = str((artifact / "weights.safetensors").resolve())
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == weights_path:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end))
    assert mapped, "the weights file is not memory-mapped"
    for name, t in loaded.weights.items():
        assert any(s <= t.data_ptr() < e for s, e in mapped), f"{name} was copied"
        assert t.data_ptr() % WEIGHTS_ALIGNMENT == 0, name
    assert not any(n.startswith(WEIGHTS_PAD_PREFIX) for n in loaded.weights)


def test_artifact_from_before_sampled_digests_loads_with_the_same_tokens(
        artifact, caplog, restore_aotllm_logging):
    """An older artifact (safetensors' own packing, no file_samples in the
    manifest) still loads: full hash, misaligned weights copied; it must give
    the tokens the mapped artifact gives."""
    prompt = ["The quick brown fox"]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    mapped = LLM(str(artifact)).generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids

    path = artifact / "weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n).clone() for n in f.keys()
                   if not n.startswith(WEIGHTS_PAD_PREFIX)}
    save_file(tensors, str(path), metadata={"format": "pt"})

    def to_old(d: dict) -> None:
        del d["file_samples"]
        d["weights_sha256"] = sha256_file(path)
    _edit_manifest(artifact, to_old)
    # LLM() stops the "aotllm" logger's propagation: listen on it directly.
    logging.getLogger("aotllm").addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="aotllm"):
        old = LLM(str(artifact)).generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert "hashing every file in full" in caplog.text
    assert "aligned and were copied" in caplog.text
    assert old == mapped and len(mapped) == 8


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


_TEXTS = ["The quick brown fox", "  spaces , and punctuation ! isn't it ?", "Ünïcödé 東京 🙂\n\tx",
          ""]


def test_runtime_tokenizer_matches_transformers(shared):
    from aotllm.runtime.tokenizer import ArtifactTokenizer, load_tokenizer

    tok = load_tokenizer(shared)
    assert isinstance(tok, ArtifactTokenizer)
    hf = tok.hf
    assert type(hf).__module__.startswith("transformers")
    specials = [str(t) for t in hf.all_special_tokens]
    for text in [*_TEXTS, *(f"x{t}y {t}" for t in specials)]:
        for add in (True, False):
            ids = hf.encode(text, add_special_tokens=add)
            assert tok.encode(text, add_special_tokens=add) == ids, text
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip), text
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    # What it lacks comes from transformers' tokenizer.
    assert tok.chat_template == hf.chat_template


def test_first_token_without_importing_transformers(artifact):
    """The runtime tokenizer keeps transformers out of a cold start; without
    it (older artifacts) transformers' tokenizer gives the same tokens and text."""
    code = (
        "import sys, json\n"
        "from aotllm import LLM, SamplingParams\n"
        "llm = LLM(sys.argv[1])\n"
        "out = llm.generate(['The quick brown fox'], SamplingParams(max_tokens=8, "
        "temperature=0.0), use_tqdm=False)[0].outputs[0]\n"
        "print(json.dumps([out.token_ids, out.text, 'transformers' in sys.modules]))\n"
    )

    def run() -> list:
        proc = subprocess.run([sys.executable, "-c", code, str(artifact)], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    ids, text, imported = run()
    assert not imported and len(ids) == 8
    _edit_manifest(artifact, lambda d: d["extra"].pop("runtime_tokenizer"))
    assert run() == [ids, text, True]
