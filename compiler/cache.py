"""The compile cache behind `LLM(model=HF_CHECKPOINT_DIR or FILE.gguf)`.

An artifact is compiled once per (checkpoint content, compile options,
aotllm/torch versions) into `$AOTLLM_CACHE_DIR` (default ~/.cache/aotllm) and
reused on every later start. How a checkpoint's content is hashed is up to its
source (models/checkpoint.py): a safetensors directory in full, a GGUF file
cheaply (size, mtime, first and last MiB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from aotllm.compiler.config import CompileConfig
from aotllm.compiler.pipeline import compile_artifact, source_hash
from aotllm.graphs.manifest import ArtifactError, Manifest, is_artifact_dir
from aotllm.models.checkpoint import open_checkpoint
from aotllm.quantize.calibrate import read_calibration_text

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("AOTLLM_CACHE_DIR", Path.home() / ".cache" / "aotllm"))


def cached_artifact(cfg: CompileConfig) -> Path:
    """The artifact for `cfg` (its `output` is ignored), compiled if not cached yet
    (or compiled afresh when `cfg.reuse` is False)."""
    source = open_checkpoint(cfg.model)
    # `reuse` says whether to use what is cached, not what is compiled.
    options = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("model", "output", "reuse")}
    if cfg.quantization is not None and cfg.quantization.calibration_data is not None:
        # The file's content, not its path, decides the calibrated scales.
        options["calibration_sha256"] = read_calibration_text(cfg.quantization.calibration_data).sha256
    payload = json.dumps(
        {"checkpoint": source.content_hash(), "options": options,
         "torch": torch.__version__, "source": source_hash()},
        sort_keys=True, default=list,
    )
    key = hashlib.sha256(payload.encode()).hexdigest()[:24]
    out = cache_root() / f"{source.cache_name()}-{key}"
    if cfg.reuse and is_artifact_dir(out):
        try:
            Manifest.read(out)
            logger.info("Using cached artifact %s", out)
            return out
        except ArtifactError as e:
            logger.warning("Recompiling the cached artifact in %s: %s", out, e)
    logger.info("Compiling %s into the cache at %s (once; later starts reuse it)", cfg.model, out)
    compile_artifact(dataclasses.replace(cfg, output=str(out)))
    return out
