"""One entry for compile and the eager runtime: a checkpoint -> the model to run.

A msModelSlim checkpoint is pre-quantized (its description names the
scheme); any other checkpoint loads in float and is quantized here when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from aotllm.models.checkpoint import CheckpointSource, open_checkpoint
from aotllm.models.decoder import CausalLM
from aotllm.models.loader import load_model
from aotllm.models.ops import Ops, TorchOps
from aotllm.quantize.apply import quantize_model
from aotllm.quantize.config import QuantConfig
from aotllm.quantize.modelslim import is_modelslim_checkpoint, load_modelslim_model


def load_quantized(checkpoint: str | Path | CheckpointSource, dtype: str | torch.dtype,
                   device: str | torch.device, quantization: QuantConfig | None,
                   tokenizer: Callable[[], Any], ops: Ops = TorchOps
                   ) -> tuple[CausalLM, dict | None]:
    """(model, the manifest's quantization record or None). `tokenizer` is called
    only when calibration needs one; `ops` is the backend's ops layer the model
    is built with (calibration runs the float model through it)."""
    source = open_checkpoint(checkpoint)
    if is_modelslim_checkpoint(source.path):
        if quantization is not None:
            raise ValueError(
                f"{source.path} is a pre-quantized msModelSlim checkpoint "
                "(quant_model_description.json names its scheme): omit --quantization"
            )
        return load_modelslim_model(source.path, dtype, device, ops=ops)
    model = load_model(source, dtype, device, ops=ops)
    if quantization is None:
        return model, None
    tok = tokenizer() if quantization.needs_calibration else None
    return model, quantize_model(model, quantization, tok)
