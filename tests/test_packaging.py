"""Packaging: the repository root installs as the package `aotllm`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("compiler", "entrypoints", "graphs", "models", "quantize", "runtime")


def test_pyproject_pins_torch_and_keeps_torch_npu_optional():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"]
    assert "torch==2.13.*" in deps
    assert not any("npu" in d.lower() for d in deps)
    assert any("torch-npu" in d for d in meta["optional-dependencies"]["ascend"])
    assert meta["scripts"]["aotllm"] == "aotllm.cli:main"


@pytest.mark.slow
def test_wheel_holds_every_module_and_no_tests_or_scripts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("aotllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        "aotllm/" + str(p.relative_to(REPO))
        for sub in SUBPACKAGES for p in (REPO / sub).rglob("*.py")
    } | {"aotllm/" + p.name for p in REPO.glob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert not any(n.startswith(("aotllm/tests/", "aotllm/scripts/", "tests/", "scripts/"))
                   for n in names)
