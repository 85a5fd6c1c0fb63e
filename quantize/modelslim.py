"""Pre-quantized msModelSlim checkpoints: read them into aotllm's quantized modules.

msModelSlim (Huawei's quantization tool, the format vllm-ascend serves) writes
a Hugging Face directory whose *.safetensors hold, per quantized linear, the
transformers name plus `weight` (int8 [out, in]), `weight_scale`,
`weight_offset` and, for static W8A8, `input_scale`, `input_offset`,
`quant_bias` (int32) and `deq_scale`; `quant_model_description.json` types
every tensor ("FLOAT", "W8A16", "W8A8", "W8A8_DYNAMIC") and the whole model
(`model_quant_type`). These are the very buffers of quantize/linear.py, so
loading is a module swap plus a copy: fused q/k/v and gate/up concatenate
their shards along the output dimension.

Anti-outlier smoothing can leave a `bias` on RMSNorms (vllm-ascend adds it to
the norm's output) and on linears that had none; the linear side of that
correction is already folded into `quant_bias` (static) or `bias` (dynamic).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.layers import Linear, RMSNorm
from aotllm.models.checkpoint import SafetensorsCheckpoint
from aotllm.models.loader import load_weights, resolve_dtype
from aotllm.models.registry import build_model
from aotllm.models.weights import checkpoint_shards
from aotllm.models.ops import TorchOps
from aotllm.quantize.apply import float_modules
from aotllm.quantize.config import QuantConfig
from aotllm.quantize.linear import W8A8DynamicLinear, W8A8StaticLinear, W8A16Linear

logger = logging.getLogger(__name__)

DESCRIPTION_FILE = "quant_model_description.json"  # the name vllm-ascend looks for
FLOAT = "FLOAT"
# msModelSlim's type -> aotllm's scheme (quantize/config.py SCHEMES).
MODEL_QUANT_TYPES = {"W8A16": "w8a16", "W8A8_DYNAMIC": "w8a8", "W8A8": "w8a8_static"}
# Description keys that describe the model, not a tensor.
_METADATA_KEYS = frozenset({"model_quant_type", "version", "group_size", "kv_cache_type",
                            "kv_quant_type", "fa_quant_type", "reduce_quant_type"})
# Metadata that would change the attention arithmetic (int8 KV cache, FA3 quant).
_UNSUPPORTED_METADATA = ("kv_cache_type", "kv_quant_type", "fa_quant_type")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # derived, not weights (as models/loader.py)
# Per linear type: the tensors aotllm needs, and the ones it also accepts.
_REQUIRED = {
    "W8A16": ("weight", "weight_scale"),
    "W8A8_DYNAMIC": ("weight", "weight_scale"),
    "W8A8": ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale"),
}
_OPTIONAL = ("weight_offset", "weight_scale", "bias")


@dataclass(frozen=True)
class ModelSlimDescription:
    path: Path
    model_quant_type: str  # as msModelSlim spells it ("W8A8_DYNAMIC")
    scheme: str  # aotllm's name for it ("w8a8")
    tensor_types: dict[str, str] = field(repr=False)  # every tensor name -> its type

    @property
    def float_tensors(self) -> frozenset[str]:
        return frozenset(n for n, t in self.tensor_types.items() if t == FLOAT)


def _description_path(model_dir: Path) -> Path | None:
    exact = model_dir / DESCRIPTION_FILE
    if exact.is_file():
        return exact
    # MindIE's scripts name it quant_model_description_w8a8.json; take it when unambiguous.
    found = sorted(model_dir.glob("quant_model_description*.json"))
    return found[0] if len(found) == 1 else None


def is_modelslim_checkpoint(model_dir: str | Path) -> bool:
    p = Path(model_dir)
    return p.is_dir() and _description_path(p) is not None


def read_description(model_dir: str | Path) -> ModelSlimDescription:
    model_dir = Path(model_dir)
    path = _description_path(model_dir)
    if path is None:
        raise FileNotFoundError(
            f"no {DESCRIPTION_FILE} in {model_dir}: not an msModelSlim checkpoint (or the "
            "description file was not copied with its weights)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object of tensor name -> quantization type")
    qtype = raw.get("model_quant_type")
    if qtype not in MODEL_QUANT_TYPES:
        said = "no model_quant_type" if qtype is None else f"model_quant_type {qtype!r}"
        raise ValueError(
            f"{path.name} in {model_dir} has {said}; aotllm reads "
            f"{', '.join(MODEL_QUANT_TYPES)} checkpoints (re-quantize with one of those, or "
            "compile the float checkpoint with --quantization)"
        )
    for key in _UNSUPPORTED_METADATA:
        if raw.get(key) not in (None, FLOAT):
            raise ValueError(
                f"{path.name} in {model_dir} sets {key}={raw[key]!r}: quantized KV cache / "
                "attention is not supported; re-quantize without it"
            )
    types = {k: v for k, v in raw.items() if k not in _METADATA_KEYS}
    bad = [k for k, v in types.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{path.name}: the type of {bad[0]!r} is not a string ({types[bad[0]]!r})")
    return ModelSlimDescription(path, qtype, MODEL_QUANT_TYPES[qtype], types)


class BiasedRMSNorm(RMSNorm):
    """RMSNorm whose output gets a per-channel bias: anti-outlier smoothing's
    norm bias, applied as vllm-ascend's AscendRMSNorm does (after the norm)."""

    def __init__(self, hidden_size: int, eps: float, ops, dtype: torch.dtype):
        super().__init__(hidden_size, eps, ops, dtype)
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


class _Tensors:
    """Every checkpoint tensor by name, read one at a time from the mapped files."""

    def __init__(self, stack: contextlib.ExitStack, model_dir: Path):
        self.files: dict[str, Any] = {}  # name -> its open safe_open handle
        self.by_module: dict[str, list[str]] = {}  # "model.layers.0.mlp.up_proj" -> its tensors
        for path in SafetensorsCheckpoint(model_dir).files():
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except SafetensorError as e:
                raise ValueError(f"{path} is not a readable safetensors file ({e}); copy it again") from e
            for name in f.keys():
                self.files[name] = f
                self.by_module.setdefault(name.rpartition(".")[0], []).append(name)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def get(self, name: str) -> torch.Tensor:
        return self.files[name].get_tensor(name)

    def rows(self, name: str) -> int:
        return self.files[name].get_slice(name).get_shape()[0]

    def is_float(self, name: str) -> bool:
        return self.files[name].get_slice(name).get_dtype() in ("F64", "F32", "F16", "BF16")


def decode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """float32 deq_scale from msModelSlim's float32, or int64 holding float32 bits
    in its low 32 (fp16 models, for the NPU's quant matmul)."""
    if t.is_floating_point():
        return t.float()
    if t.dtype != torch.int64:
        raise ValueError(f"deq_scale must be float32 or int64, got {t.dtype}")
    low = t.numpy().astype(np.int64) & 0xFFFFFFFF
    return torch.from_numpy(low.astype(np.uint32).view(np.float32).copy())


def encode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `decode_deq_scale`'s int64 form (sign-extended bits, as vllm-ascend)."""
    return t.float().contiguous().view(torch.int32).to(torch.int64)


def _shard_prefixes(model: CausalLM, linear_name: str) -> list[str]:
    """The checkpoint's linear names behind one of the model's (maybe fused) linears,
    in row order (their tensors concatenate into the fused one)."""
    shards = checkpoint_shards(model.weight_map, f"{linear_name}.weight")
    if not shards:  # a tied lm_head: no tensor of its own
        return [linear_name]
    if any(s.rows is not None or s.expert is not None for _, s in shards):
        raise ValueError(
            f"msModelSlim checkpoints of {model.config.architecture} are not supported: "
            f"its {linear_name} is regrouped on load. Quantize the float checkpoint with "
            "aotllm instead (--quantization)"
        )
    return [name.removesuffix(".weight") for name, _ in shards]


def _cat(tensors: _Tensors, prefixes: list[str], attr: str) -> torch.Tensor:
    return torch.cat([tensors.get(f"{p}.{attr}") for p in prefixes], dim=0)


def _per_tensor(tensors: _Tensors, prefixes: list[str], attr: str, linear: str) -> torch.Tensor:
    """A static per-tensor activation parameter, which the fused shards must share."""
    values = [tensors.get(f"{p}.{attr}").float().reshape(-1) for p in prefixes]
    if any(v.numel() != 1 for v in values):
        raise ValueError(f"{prefixes[0]}.{attr} must hold one value (per-tensor), got {values[0].numel()}")
    if any(not torch.equal(v, values[0]) for v in values[1:]):
        shown = ", ".join(f"{p}: {v.item():g}" for p, v in zip(prefixes, values))
        raise ValueError(
            f"{attr} differs across {', '.join(prefixes)} ({shown}). aotllm runs them as one fused "
            f"matmul ({linear}) over the same input, so they need one activation {attr}; "
            "re-quantize so they share it"
        )
    return values[0]


def _check_offset(tensors: _Tensors, prefixes: list[str]) -> None:
    for p in prefixes:
        name = f"{p}.weight_offset"
        if name in tensors and bool(tensors.get(name).float().ne(0).any()):
            raise ValueError(
                f"{name} has non-zero zero points: asymmetric int8 weights are not supported "
                "(aotllm's int8 weights are symmetric); re-quantize with symmetric weights"
            )


def _quant_linear(tensors: _Tensors, qtype: str, name: str, linear: Linear,
                  prefixes: list[str], has_bias: bool) -> nn.Module:
    allowed = {*_REQUIRED[qtype], *_OPTIONAL}
    for p in prefixes:
        for t in tensors.by_module.get(p, []):
            if t.removeprefix(f"{p}.") not in allowed:
                raise ValueError(f"checkpoint tensor {t!r} is not part of msModelSlim's {qtype} "
                                 "format as aotllm reads it; re-quantize with a plain " + qtype)
        for attr in _REQUIRED[qtype]:
            if f"{p}.{attr}" not in tensors:
                raise ValueError(f"{p} is typed {qtype} but the checkpoint has no {p}.{attr}")
    _check_offset(tensors, prefixes)
    weight = _cat(tensors, prefixes, "weight")
    if weight.dtype != torch.int8 or tuple(weight.shape) != tuple(linear.weight.shape):
        raise ValueError(f"{', '.join(p + '.weight' for p in prefixes)}: expected int8 "
                         f"{tuple(linear.weight.shape)} in all, got {weight.dtype} {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    # Biases are float tensors: the caller's float pass loads them into this parameter.
    bias = None
    if has_bias:
        bias = nn.Parameter(torch.empty(out_f, dtype=linear.weight.dtype), requires_grad=False)
    if qtype == "W8A8":
        m = W8A8StaticLinear(in_f, out_f, linear.ops)
        m.input_scale = _per_tensor(tensors, prefixes, "input_scale", name)
        m.input_offset = _per_tensor(tensors, prefixes, "input_offset", name)
        m.quant_bias = _cat(tensors, prefixes, "quant_bias").to(torch.int32)
        m.deq_scale = torch.cat([decode_deq_scale(tensors.get(f"{p}.deq_scale")) for p in prefixes])
        if m.quant_bias.shape != (out_f,) or m.deq_scale.shape != (out_f,):
            raise ValueError(f"{', '.join(prefixes)}: quant_bias and deq_scale need one value per "
                             f"output channel ({out_f} in all)")
    else:
        for p in prefixes:
            if tensors.rows(f"{p}.weight_scale") != tensors.rows(f"{p}.weight"):
                raise ValueError(f"{p}.weight_scale needs one row per output channel of {p}.weight")
        scale = _cat(tensors, prefixes, "weight_scale").float()
        scale = scale.reshape(out_f, -1)
        groups = scale.shape[1]
        if qtype == "W8A8_DYNAMIC" or groups == 1:
            if groups != 1:
                raise ValueError(f"{prefixes[0]}.weight_scale must be per output channel for W8A8_DYNAMIC")
            scale = scale.reshape(out_f)
        elif in_f % groups:
            raise ValueError(f"{prefixes[0]}.weight_scale has {groups} groups, which do not divide {in_f}")
        if qtype == "W8A16":
            m = W8A16Linear(in_f, out_f, linear.ops, bias, None if groups == 1 else in_f // groups)
            scale = scale.to(linear.weight.dtype)  # see W8A16Linear
        else:
            m = W8A8DynamicLinear(in_f, out_f, linear.ops, bias)
        m.weight_scale = scale
    m.weight = weight
    return m


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _float_tensors(tensors: _Tensors, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        if not tensors.is_float(name):
            raise ValueError(f"checkpoint tensor {name!r} is not a float tensor, but aotllm "
                             "reads it as one: its linear must be typed W8A16/W8A8/W8A8_DYNAMIC")
        yield name, tensors.get(name)


def _check_coverage(desc: ModelSlimDescription, tensors: _Tensors) -> None:
    absent = sorted(n for n in desc.tensor_types if n not in tensors)
    if absent:
        raise ValueError(
            f"{desc.path.name} names {len(absent)} tensor(s) missing from the safetensors files: "
            f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}. Copy the complete checkpoint"
        )
    uncovered = sorted(n for n in tensors if n not in desc.tensor_types)
    if uncovered:
        raise ValueError(
            f"checkpoint tensor(s) {', '.join(uncovered[:8])} are not in {desc.path.name}: "
            "the description and the weights do not belong together"
        )


def load_modelslim_model(model_dir: str | Path, dtype: str | torch.dtype = "auto",
                         device: str | torch.device = "cpu", ops=TorchOps) -> tuple[CausalLM, dict]:
    """The quantized CausalLM of an msModelSlim checkpoint, and its manifest quantization record."""
    model_dir = Path(model_dir)
    desc = read_description(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device(device):
        model = build_model(config, torch_dtype, ops)
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(stack, model_dir)
        _check_coverage(desc, tensors)
        consumed: set[str] = set()
        quantized: list[str] = []
        for name, module in list(model.named_modules()):
            if isinstance(module, RMSNorm) and f"{name}.bias" in tensors:
                with torch.device(device):
                    _swap(model, name, BiasedRMSNorm(module.weight.shape[0], module.eps, ops, torch_dtype))
                continue
            if not isinstance(module, Linear):
                continue
            prefixes = _shard_prefixes(model, name)
            types = {desc.tensor_types.get(f"{p}.weight") for p in prefixes}
            if types == {None}:
                continue  # tied lm_head: no tensor of its own
            if len(types) > 1:
                raise ValueError(f"{', '.join(prefixes)} have different types {sorted(map(str, types))}: "
                                 f"aotllm fuses them into {name}, so they must share one")
            qtype = types.pop()
            if qtype == FLOAT:
                continue
            if qtype not in _REQUIRED:
                raise ValueError(f"{prefixes[0]}.weight is typed {qtype!r}; aotllm reads "
                                 f"{', '.join(_REQUIRED)} linears (or FLOAT)")
            own = {t for p in prefixes for t in tensors.by_module.get(p, [])}
            has_bias = module.bias is not None or any(f"{p}.bias" in tensors for p in prefixes)
            # Static W8A8 folds the float bias into quant_bias (vllm-ascend ignores `bias`
            # there too); the other types keep it as the module's float bias.
            has_bias = has_bias and qtype != "W8A8"
            new = _quant_linear(tensors, qtype, name, module, prefixes, has_bias)
            _swap(model, name, new.to(device))
            consumed |= own - ({f"{p}.bias" for p in prefixes} if has_bias else set())
            quantized.append(name)
        rest = [n for n in tensors if n not in consumed and not n.endswith(_IGNORED_SUFFIXES)
                and not (n == "lm_head.weight" and config.tie_word_embeddings)]
        load_weights(model, SafetensorsCheckpoint(model_dir), _float_tensors(tensors, rest))
    model = model.to(device).eval()
    return model, _record(model, desc, quantized)


def _record(model: CausalLM, desc: ModelSlimDescription, quantized: list[str]) -> dict:
    """quantize_model's record (quantize/apply.py), for a checkpoint quantized elsewhere."""
    kept = sorted(n for n, m in model.named_modules() if isinstance(m, Linear))
    groups = {m.in_features // m.weight_scale.shape[1] for m in model.modules()
              if isinstance(m, W8A16Linear) and m.weight_scale.dim() == 2}
    group_size = groups.pop() if len(groups) == 1 else None
    cfg = QuantConfig(desc.scheme, group_size=group_size if desc.scheme == "w8a16" else None,
                      exclude=tuple(n for n in kept if n != "lm_head"),
                      quantize_lm_head="lm_head" in quantized)
    record = {"scheme": desc.scheme, "group_size": cfg.group_size, "config": cfg.to_dict(),
              "smoothquant": None, "calibration": None, "quantized_linears": len(quantized),
              "float_modules": float_modules(model),
              "source": "msmodelslim", "model_quant_type": desc.model_quant_type}
    logger.info("Loaded msModelSlim %s checkpoint: %d quantized linears (kept in %s: %s)",
                desc.model_quant_type, len(quantized), str(model.dtype).removeprefix("torch."),
                ", ".join(record["float_modules"]))
    return record
