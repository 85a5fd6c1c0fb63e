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
    # Per family, two configs apart in what their loaders and layers must get right.
    "qwen3-gqa": ("qwen3", {}),
    "qwen3-mqa-bias-tied": ("qwen3", {"num_key_value_heads": 1, "attention_bias": True,
                                      "tie_word_embeddings": True}),
    "glm-gqa-bias": ("glm", {}),
    "glm4-mqa-tied": ("glm4", {"num_key_value_heads": 1, "attention_bias": False,
                               "tie_word_embeddings": True}),
    "falcon-mqa": ("falcon", {"multi_query": True}),
    "falcon-newarch-bias-tied": ("falcon", {"new_decoder_architecture": True, "bias": True,
                                            "tie_word_embeddings": True}),
    "falcon-mha-sequential": ("falcon", {"multi_query": False, "parallel_attn": False,
                                         "num_kv_heads": 4}),
    "mixtral-top2": ("mixtral", {}),
    "mixtral-top1-mqa-tied": ("mixtral", {"num_local_experts": 3, "num_experts_per_tok": 1,
                                          "num_key_value_heads": 1, "tie_word_embeddings": True}),
    # Qwen's MoE: a shared expert behind a sigmoid gate, top-k weights not
    # renormalised; a dense MLP layer among the MoE layers (and the other way round).
    "qwen2-moe-shared": ("qwen2_moe", {}),
    "qwen2-moe-dense-layer-tied": ("qwen2_moe", {"mlp_only_layers": [1], "norm_topk_prob": True,
                                                 "num_key_value_heads": 1,
                                                 "tie_word_embeddings": True}),
    "qwen3-moe-norm-topk": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen3-moe-sparse-step-mqa-bias": ("qwen3_moe", {"decoder_sparse_step": 2,
                                                     "num_key_value_heads": 1,
                                                     "attention_bias": True}),
    # Remote-code layouts (tests/remote_code.py), each compared with the
    # transformers model of the same network.
    "internlm2-gqa-bias": ("internlm2", {"attention_bias": True}),
    "internlm2-mqa-dynamic": ("internlm2", {
        "num_key_value_heads": 1, "max_position_embeddings": 40,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "chatglm-mqa-bias": ("chatglm", {"num_key_value_heads": 1}),
    "chatglm-gqa-ratio": ("chatglm", {"attention_bias": False, "rope_theta": 50000.0}),
}


class TinyModels:
    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def get(self, name: str, **kwargs) -> Path:
        """A checkpoint directory for a variant name (or family + overrides)."""
        return self._get(name, kwargs)[0]

    def reference(self, name: str, **kwargs) -> Path:
        """The transformers checkpoint computing the same network as `get`'s
        (itself, except for remote-code layouts)."""
        return self._get(name, kwargs)[1]

    def _get(self, name: str, kwargs: dict) -> tuple[Path, Path]:
        from tests.remote_code import CONVERTERS

        key = name + json.dumps(kwargs, sort_keys=True)
        if key not in self._built:
            if name in MODEL_VARIANTS:
                family, overrides = MODEL_VARIANTS[name]
                kwargs = {**overrides, **kwargs}
            else:
                family = name
            out = self.root / f"m{len(self._built)}-{name}"
            base, convert = CONVERTERS.get(family, (family, None))
            load_script("build_tiny_model").build_tiny_model(out, family=base, **kwargs)
            self._built[key] = (out, out)
            if convert is not None:
                self._built[key] = (convert(out, out.with_name(out.name + "-remote")), out)
        return self._built[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the tiny eager models gain nothing
    from more, and on a shared 2-core machine spin-waiting threads made such
    modules several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_aotllm_logging():
    """cli.main() installs a handler on the "aotllm" logger and stops propagation;
    undo it so other test files' caplog still sees aotllm's records."""
    import logging

    log = logging.getLogger("aotllm")
    saved = (list(log.handlers), log.propagate, log.level)
    yield
    log.handlers[:], log.propagate, log.level = saved


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models.get("llama-gqa")


# One small bucket plan for every compiled-artifact test: two prefill sizes
# (so long prompts chunk), two decode batch sizes x two context sizes (so
# batches and contexts pad). Compiling takes ~7 s per graph on 2 cores.
COMPILE_PLAN = dict(
    max_model_len=128,
    max_num_seqs=4,
    block_size=16,
    prefill_buckets=(16, 64),
    decode_batch_sizes=(1, 4),
    context_buckets=(64, 128),
)


class Artifacts:
    """Compiled artifacts, built once per test session and shared."""

    def __init__(self, root: Path, models: TinyModels):
        self.root = root
        self.models = models
        self._built: dict[tuple, Path] = {}

    def get(self, variant: str = "llama-gqa", dtype: str = "float32",
            quantization: str | None = None, model_kwargs: dict | None = None,
            **plan) -> Path:
        """`model_kwargs` override the variant's config (TinyModels.get)."""
        from aotllm.compiler.config import CompileConfig
        from aotllm.compiler.pipeline import compile_artifact
        from aotllm.quantize.config import QuantConfig

        options = {**COMPILE_PLAN, **plan}
        model_kwargs = model_kwargs or {}
        key = (variant, dtype, quantization, tuple(sorted(options.items())),
               json.dumps(model_kwargs, sort_keys=True))
        if key not in self._built:
            out = self.root / f"a{len(self._built)}-{variant}-{dtype}-{quantization}"
            quant = QuantConfig(quantization) if quantization else None
            compile_artifact(CompileConfig(
                model=str(self.models.get(variant, **model_kwargs)), output=str(out), dtype=dtype,
                quantization=quant, **options
            ))
            self._built[key] = out
        return self._built[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_models) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("artifacts"), tiny_models)
