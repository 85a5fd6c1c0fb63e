"""Default sampling parameters from the model's generation_config.json (vLLM's
`--generation-config`).

Model authors ship their recommended sampling settings in
generation_config.json (SmolLM2: temperature 0.2, top_p 0.9). vLLM applies
them as the defaults of every request that leaves a field unset, unless it is
started with `--generation-config vllm`; aotllm does the same, for `LLM`
(`get_default_sampling_params`, `generate(prompts)` without params) and for
the server. An explicit field in a request always wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field (vLLM's list).
_SAMPLING_KEYS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}
MODES_HELP = "'auto' (the model's generation_config.json), 'vllm' (none) or a directory"


def read_generation_config(model: str | Path, mode: str,
                           source_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The generation config `mode` selects.

    auto: the model's own (`source_config` when its checkpoint source already
    read it, e.g. from GGUF metadata; else `model`/generation_config.json);
    vllm: none; anything else: a directory holding generation_config.json.
    """
    if mode == "vllm":
        return {}
    if mode == "auto":
        if source_config is not None:
            return dict(source_config)
        path = Path(model) / "generation_config.json"
        return _read(path) if path.is_file() else {}
    path = Path(mode) / "generation_config.json"
    if not path.is_file():
        raise ValueError(f"generation_config={mode!r}: {path} does not exist; pass {MODES_HELP}")
    return _read(path)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}. Fix the file or pass "
                         "generation_config='vllm' to ignore it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def default_sampling_overrides(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams fields the generation config sets (vLLM's
    `get_diff_sampling_param`); empty when it sets none.

    transformers writes sampling values even where `do_sample` is false
    (greedy), and vLLM applies them regardless; so does this."""
    overrides = {field: generation_config[key] for key, field in _SAMPLING_KEYS.items()
                 if generation_config.get(key) is not None}
    if overrides:
        logger.info(
            "Default sampling parameters have been overridden by the model's generation "
            "config: %s. Pass generation_config='vllm' (--generation-config vllm) to use "
            "aotllm's defaults.", overrides)
    return overrides
