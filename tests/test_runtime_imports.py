"""runtime/ never imports the compiler or torch._dynamo (a serving host needs neither)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("aotllm.compiler", "torch._dynamo")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`, a module of `package`.

    Relative imports are resolved; `from pkg import name` yields both pkg and
    pkg.name (name may be a submodule); import_module/__import__ calls with a
    literal name count too.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
    return found


def test_import_scan_sees_every_form():
    # The static check below is only as good as this scan.
    source = (
        "import torch._dynamo\n"
        "from ..compiler import pipeline\n"
        "from . import artifact\n"
        "from aotllm import compiler\n"
        "from torch import _dynamo as d\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('aotllm.compiler.cache')\n"
    )
    modules = [m for _, m in _imported_modules(source, "aotllm.runtime")]
    assert sorted(m for m in modules if _forbidden(m)) == [
        "aotllm.compiler", "aotllm.compiler", "aotllm.compiler.cache",
        "aotllm.compiler.pipeline", "torch._dynamo", "torch._dynamo",
    ]
    assert "aotllm.runtime.artifact" in modules


def test_runtime_sources_do_not_import_the_compiler_or_dynamo():
    files = sorted((REPO / "runtime").rglob("*.py"))
    assert len(files) > 5
    bad = []
    for path in files:
        rel = path.relative_to(REPO)
        package = ".".join(("aotllm", *rel.parent.parts))
        bad += [f"{rel}:{line}: {module}"
                for line, module in _imported_modules(path.read_text(), package)
                if _forbidden(module)]
    assert not bad, "runtime/ imports " + "; ".join(bad)


_SERVE_SCRIPT = """
import json, sys
from aotllm.runtime.engine_args import EngineArgs
from aotllm.runtime.loader import build_engine
from aotllm.runtime.sampling_params import SamplingParams

engine = build_engine(EngineArgs(model=sys.argv[1]))
engine.add_request("r", {"prompt_token_ids": [5, 6, 7, 8]},
                   SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
tokens = []
while engine.has_unfinished_requests():
    for out in engine.step():
        tokens = out.outputs[0].token_ids
print(json.dumps({"tokens": tokens, "modules": sorted(sys.modules)}))
"""


@pytest.mark.slow
def test_serving_an_artifact_loads_no_compiler_module(artifacts):
    artifact = artifacts.get("llama-gqa", "float32")
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE_SCRIPT, str(artifact)],
        capture_output=True, text=True, timeout=300, cwd=REPO.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["tokens"]) == 5
    loaded = [m for m in result["modules"] if _forbidden(m)]
    assert not loaded, f"serving imported {loaded}"
