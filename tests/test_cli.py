"""The `aotllm` console script, run in-process through `main(argv)`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from aotllm.cli import int_list, main

GREEDY = ["--temperature", "0", "--max-tokens", "8", "--max-model-len", "64"]


pytestmark = pytest.mark.usefixtures("restore_aotllm_logging")


def _completions(out: str) -> list[str]:
    return re.findall(r"^Generated: (.*)$", out, flags=re.M)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys; from aotllm.cli import main; rc = main(['--help']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "compile" in proc.stdout and "generate" in proc.stdout


def test_generate_eager_prints_prompt_and_completion(llama_dir, capsys):
    rc = main(["generate", str(llama_dir), "--enforce-eager", "-p", "Hello world",
               "-p", "The quick brown", "--max-num-seqs", "2", *GREEDY])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Prompt: 'Hello world'" in out and "Prompt: 'The quick brown'" in out
    assert len(_completions(out)) == 2
    n = int(re.search(r"Generated (\d+) tokens for 2 prompts .* tokens/s\); model loaded in",
                      out).group(1))
    assert 2 <= n <= 16


def test_generate_chat_applies_the_template(llama_dir, capsys):
    rc = main(["generate", str(llama_dir), "--enforce-eager", "--chat", "-p", "Hi", *GREEDY])
    out = capsys.readouterr().out
    assert rc == 0
    # The printed prompt is what the model saw: the ChatML turn, not the bare text.
    assert "<|im_start|>user\\nHi<|im_end|>" in out
    assert len(_completions(out)) == 1


def test_bad_sampling_value_is_one_line_error_before_loading(llama_dir, capsys):
    rc = main(["generate", str(llama_dir), "--enforce-eager", "-p", "x", "--temperature", "-1"])
    err = capsys.readouterr().err
    assert rc == 2
    # One line and nothing else: the model was never loaded (no log lines).
    assert "temperature" in _one_error_line(err)


def test_missing_model_dir(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", str(missing), "-p", "x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "not a local directory" in line

    assert main(["compile", str(missing), "--output", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "config.json" in line


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a local directory"):
        main(["--debug", "generate", str(tmp_path / "nope"), "-p", "x"])
    monkeypatch.setenv("AOTLLM_DEBUG", "1")
    with pytest.raises(ValueError, match="not a local directory"):
        main(["generate", str(tmp_path / "nope"), "-p", "x"])


@pytest.mark.parametrize("value", ["16,x", "16,,64", "16,-4", "0", ""])
def test_malformed_bucket_list_is_rejected(llama_dir, tmp_path, capsys, value):
    rc = main(["compile", str(llama_dir), "--output", str(tmp_path / "a"),
               "--prefill-buckets", value])
    assert rc == 2
    assert "argument --prefill-buckets" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_int_list():
    assert int_list("16,64,256") == (16, 64, 256)
    assert int_list(" 8 ") == (8,)


def test_bucket_plan_error_from_the_compiler_is_one_line(llama_dir, tmp_path, capsys):
    # Valid ints, but the largest decode batch must equal --max-num-seqs.
    rc = main(["compile", str(llama_dir), "--output", str(tmp_path / "a"), "--max-model-len",
               "64", "--max-num-seqs", "2", "--decode-batch-sizes", "1"])
    assert rc == 2
    assert "max_num_seqs" in _one_error_line(capsys.readouterr().err.splitlines()[-1])


@pytest.mark.slow
def test_compile_then_generate_matches_eager(llama_dir, tmp_path, capsys):
    artifact = tmp_path / "artifact"
    rc = main(["compile", str(llama_dir), "--output", str(artifact), "--dtype", "float32",
               "--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "1",
               "--prefill-buckets", "16", "--decode-batch-sizes", "1",
               "--context-buckets", "64"])
    assert rc == 0
    assert "Compiled 2 bucket graphs" in capsys.readouterr().out
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert sorted(g["bucket"]["phase"] for g in manifest["graphs"]) == ["decode", "prefill"]

    prompt = ["-p", "Hello world"]
    assert main(["generate", str(artifact), *prompt, *GREEDY]) == 0
    compiled = _completions(capsys.readouterr().out)
    assert main(["generate", str(llama_dir), "--enforce-eager", "--dtype", "float32",
                 *prompt, *GREEDY]) == 0
    eager = _completions(capsys.readouterr().out)
    assert compiled == eager and len(compiled) == 1


def test_verify_of_a_directory_without_manifest_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not an aotllm artifact" in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_verify_passes_a_good_artifact_and_finds_what_loading_cannot(artifacts, tmp_path,
                                                                      capsys):
    import dataclasses

    import torch

    from aotllm.graphs.file_digest import FileSample, sample_ranges, sampled_sha256
    from aotllm.graphs.manifest import Manifest
    from aotllm.runtime.artifact import load_artifact

    artifact = shutil.copytree(artifacts.get("llama-gqa", "float32"), tmp_path / "artifact")
    assert main(["verify", str(artifact)]) == 0
    assert "files match their sha256" in capsys.readouterr().out

    # The tiny model's weights fit in the default samples; sample sparser
    # (the manifest records the rule's parameters) so some bytes go unsampled.
    manifest = Manifest.read(artifact)
    path = artifact / "weights.safetensors"
    old = manifest.file_samples.files["weights.safetensors"]
    sparse = {name: FileSample(s.size, s.head_bytes,
                               sampled_sha256(artifact / name, s.size, s.head_bytes, 4096, 4))
              for name, s in manifest.file_samples.files.items()}
    table = dataclasses.replace(manifest.file_samples, chunk_bytes=4096, chunks=4, files=sparse)
    dataclasses.replace(manifest, file_samples=table).write(artifact)
    covered = sample_ranges(old.size, old.head_bytes, 4096, 4)
    offset = next(o for o in range(old.size - 1, 0, -4096)
                  if not any(s <= o < e for s, e in covered))
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))

    load_artifact(artifact, torch.device("cpu"))  # the cheap check cannot see it
    capsys.readouterr()  # the load's progress and log lines
    assert main(["verify", str(artifact)]) == 1
    err = _one_error_line(capsys.readouterr().err)
    assert "weights.safetensors is corrupted" in err
