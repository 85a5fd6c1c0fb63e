"""Shared fixtures: tiny checkpoints built locally once per test session."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import a module from scripts/ (not an installed package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Variants the parity tests cover: each names a family and config overrides.
MODEL_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", {}),
    "llama-mqa-headdim": ("llama", {"num_key_value_heads": 1, "head_dim": 32}),
    "llama3-rope-bias": (
        "llama",
        {
            "attention_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral-window": ("mistral", {"sliding_window": 24}),
}


class TinyModels:
    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def get(self, name: str, **kwargs) -> Path:
        """A checkpoint directory for a variant name (or family + overrides)."""
        key = name + json.dumps(kwargs, sort_keys=True)
        if key not in self._built:
            if name in MODEL_VARIANTS:
                family, overrides = MODEL_VARIANTS[name]
                kwargs = {**overrides, **kwargs}
            else:
                family = name
            out = self.root / f"m{len(self._built)}-{name}"
            load_script("build_tiny_model").build_tiny_model(out, family=family, **kwargs)
            self._built[key] = out
        return self._built[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models.get("llama-gqa")
