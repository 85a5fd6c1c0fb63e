"""Write an aotllm-quantized CausalLM as an msModelSlim checkpoint.

The result loads in vllm-ascend (`--quantization ascend`) and back into aotllm
(quantize/modelslim.py): transformers tensor names (q/k/v and gate/up split
again), per-channel scales as [out, 1], all-zero weight offsets (aotllm's
weights are symmetric), and `quant_model_description.json`. Scales stay
float32 so that reading the checkpoint back reproduces the model exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from aotllm.models.decoder import CausalLM
from aotllm.models.weights import checkpoint_shards
from aotllm.quantize.config import resolve_scheme
from aotllm.quantize.linear import W8A8StaticLinear, W8A16Linear, _QuantLinear
from aotllm.quantize.modelslim import DESCRIPTION_FILE, FLOAT, MODEL_QUANT_TYPES, encode_deq_scale

SCHEME_TO_TYPE = {scheme: qtype for qtype, scheme in MODEL_QUANT_TYPES.items()}
# Source files that are weights (replaced by ours) or would describe them wrongly.
_NOT_COPIED = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt",
               "quant_model_description*.json")


def _quant_tensors(model: CausalLM, m: _QuantLinear) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors split along the output dim, per-tensor ones every shard repeats)."""
    rows: dict[str, torch.Tensor] = {"weight": m.weight}
    shared: dict[str, torch.Tensor] = {}
    if isinstance(m, W8A8StaticLinear):
        # Not read by aotllm or vllm-ascend (deq_scale holds it), kept for the format.
        w_scale = m.deq_scale.float() / m.input_scale.float()
        rows["weight_scale"] = w_scale.unsqueeze(1)
        rows["quant_bias"] = m.quant_bias.to(torch.int32)
        # fp16 models: the NPU's quant matmul takes the float32 bits as int64.
        rows["deq_scale"] = (encode_deq_scale(m.deq_scale) if model.dtype == torch.float16
                             else m.deq_scale.float())
        shared["input_scale"] = m.input_scale.float().reshape(1)
        shared["input_offset"] = m.input_offset.float().reshape(1)
    else:
        scale = m.weight_scale.float()
        rows["weight_scale"] = scale.unsqueeze(1) if scale.dim() == 1 else scale
    rows["weight_offset"] = torch.zeros_like(rows["weight_scale"])
    if m.bias is not None:
        rows["bias"] = m.bias.detach()
    return rows, shared


def _split(model: CausalLM, module_name: str, attr: str, t: torch.Tensor,
           per_row: bool) -> list[tuple[str, torch.Tensor]]:
    """Checkpoint (name, tensor) pairs of one of the model's (maybe fused) tensors,
    split back apart through the model's weight map."""
    own = checkpoint_shards(model.weight_map, f"{module_name}.{attr}")
    if own:
        pairs = [(name, shard) for name, shard in own]
    else:  # a quantized linear's own tensor (scale, offset): rows laid out as its weight's
        pairs = [(f"{name.removesuffix('.weight')}.{attr}", shard) for name, shard
                 in checkpoint_shards(model.weight_map, f"{module_name}.weight")]
    # clone: safetensors refuses tensors that share storage.
    return [(name, (shard.unload(t) if per_row else t).detach().cpu().clone())
            for name, shard in pairs]


def write_modelslim_checkpoint(model: CausalLM, record_scheme: str, hf_source_dir: str | Path,
                               out_dir: str | Path) -> Path:
    """Write `model` (after quantize_model with `record_scheme`) to `out_dir`; config and
    tokenizer files come from `hf_source_dir`, the float checkpoint it was built from."""
    scheme = resolve_scheme(record_scheme)
    if scheme not in SCHEME_TO_TYPE:
        raise ValueError(f"msModelSlim has no format for scheme {record_scheme!r}")
    model_type = SCHEME_TO_TYPE[scheme]
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    group_sizes: set[int] = set()
    saved = set(model.state_dict())  # parameters and persistent buffers (not inv_freq)
    for name, module in model.named_modules():
        if isinstance(module, _QuantLinear):
            qtype = SCHEME_TO_TYPE[module.scheme]
            rows, shared = _quant_tensors(model, module)
            if isinstance(module, W8A16Linear) and module.weight_scale.dim() == 2:
                group_sizes.add(module.in_features // module.weight_scale.shape[1])
            pieces = [(a, t, True) for a, t in rows.items()] + [(a, t, False) for a, t in shared.items()]
            for attr, t, per_row in pieces:
                for ckpt_name, part in _split(model, name, attr, t, per_row):
                    tensors[ckpt_name] = part
                    types[ckpt_name] = FLOAT if attr == "bias" else qtype
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue  # tied: the checkpoint has only the embedding, as transformers saves it
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for attr, t in own:
            if f"{name}.{attr}" in saved:
                for ckpt_name, part in _split(model, name, attr, t, per_row=True):
                    tensors[ckpt_name] = part
                    types[ckpt_name] = FLOAT

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(hf_source_dir)
    skip = {p for pattern in _NOT_COPIED for p in src.glob(pattern)}
    for path in src.iterdir():
        if path.is_file() and path not in skip:
            shutil.copy2(path, out / path.name)
    # The float tensors are in the model's dtype now; say so, so dtype="auto" reads them back as is.
    config = json.loads((src / "config.json").read_text())
    dtype_name = str(model.dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    config.update(dict.fromkeys(keys, dtype_name))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    save_file(tensors, str(out / f"quant_model_weight_{model_type.lower()}.safetensors"),
              metadata={"format": "pt"})
    description: dict = {"model_quant_type": model_type}
    if len(group_sizes) == 1:
        description["group_size"] = group_sizes.pop()
    description.update(sorted(types.items()))
    (out / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return out
