"""The one place a float model becomes a quantized one: a module swap.

`quantize_model` replaces each float `Linear` (except the excluded ones) by the
scheme's quantized module, after SmoothQuant folding for the w8a8 schemes.
Model files never know about schemes; they only build `Linear`s.
"""

from __future__ import annotations

import fnmatch
import logging
import time

import torch
from torch import nn

from aotllm.models.layers import Linear
from aotllm.quantize.calibrate import (
    calibration_tokens, collect_input_absmax, read_calibration_text,
)
from aotllm.quantize.config import QuantConfig
from aotllm.quantize.linear import W8A8DynamicLinear, W8A8StaticLinear, W8A16Linear
from aotllm.quantize.primitives import smoothquant_scales

logger = logging.getLogger(__name__)

# Kept in the model dtype unless asked otherwise: the LM head decides every
# sampled token and is the most sensitive linear.
LM_HEAD = "lm_head"


def target_linears(model: nn.Module, cfg: QuantConfig) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if name == LM_HEAD and not cfg.quantize_lm_head:
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in cfg.exclude):
            continue
        names.append(name)
    return names


@torch.no_grad()
def smooth(model: nn.Module, stats: dict[str, torch.Tensor], alpha: float) -> int:
    """Fold SmoothQuant scales into each smoothing group (the norms, and up_proj
    for down_proj); updates `stats` to the smoothed activations. Returns the
    number of groups folded."""
    modules = {id(m): n for n, m in model.named_modules()}
    folded = 0
    for layer in model.model.layers:
        for producers, linears in layer.smoothing_groups():
            names = [modules[id(lin)] for lin in linears]
            if not all(n in stats for n in names):
                continue  # a linear of the group stays float: leave the group alone
            act = stats[names[0]]
            w_max = torch.stack([lin.weight.float().abs().amax(0) for lin in linears]).amax(0)
            s = smoothquant_scales(act, w_max, alpha)
            for t in producers:
                t.copy_((t.float() / s.view(-1, *[1] * (t.dim() - 1))).to(t.dtype))
            for lin, name in zip(linears, names):
                lin.weight.copy_((lin.weight.float() * s).to(lin.weight.dtype))
                stats[name] = stats[name] / s
            folded += 1
    return folded


def float_modules(model: nn.Module) -> list[str]:
    """The manifest's list of what stays in the model dtype: every float
    `Linear` left (the LM head, exclusions), then every other module that owns
    a weight matrix. Those are the embedding and, in MoE families, each
    layer's router (`mlp.gate`) and stacked experts (`mlp.experts`): the
    schemes quantize `Linear`s only, and an expert stack is not one."""
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, Linear))
    # Quantized linears hold their int8 weight as a buffer, so they own no
    # matrix parameter and are not listed.
    others = [n for n, m in model.named_modules() if not isinstance(m, Linear)
              and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    return linears + others


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, cfg: QuantConfig, tokenizer=None) -> dict:
    """Quantizes `model` in place; returns the manifest's quantization record."""
    t0 = time.perf_counter()
    names = target_linears(model, cfg)
    modules = dict(model.named_modules())
    record: dict = {"scheme": cfg.scheme, "group_size": cfg.group_size,
                    "config": cfg.to_dict(), "smoothquant": None, "calibration": None}
    stats: dict[str, torch.Tensor] = {}
    if cfg.needs_calibration:
        if tokenizer is None:
            raise ValueError(f"{cfg.scheme} needs calibration text, and so a tokenizer")
        data = read_calibration_text(cfg.calibration_data)
        ids = calibration_tokens(tokenizer, data, cfg.calibration_tokens, model.config.vocab_size)
        stats = collect_input_absmax(model, ids, names)
        folded = smooth(model, stats, cfg.smoothquant_alpha)
        record["calibration"] = {"source": data.source, "sha256": data.sha256,
                                 "num_tokens": len(ids)}
        record["smoothquant"] = {"alpha": cfg.smoothquant_alpha, "groups_folded": folded}
    for name in names:
        lin = modules[name]
        if cfg.scheme == "w8a16":
            new = W8A16Linear.from_float(lin, cfg.group_size)
        elif cfg.scheme == "w8a8":
            new = W8A8DynamicLinear.from_float(lin)
        else:
            new = W8A8StaticLinear.from_float(lin, float(stats[name].max()))
        _swap(model, name, new.to(lin.weight.device))
    record["quantized_linears"] = len(names)
    record["float_modules"] = float_modules(model)
    logger.info("Quantized %d linears to %s in %.1f s (kept in %s: %s)", len(names), cfg.scheme,
                time.perf_counter() - t0, str(model.dtype).removeprefix("torch."),
                ", ".join(record["float_modules"]) or "nothing")
    return record


def quantized_skeleton(model: nn.Module, record: dict) -> int:
    """Swaps in empty quantized linears where `record` (quantize_model's or a
    msModelSlim load's) says the model was quantized, so a compiled
    artifact's quantized weights can be loaded into it: every `Linear` not
    in `record["float_modules"]` becomes the scheme's module, as
    quantize_model made it. Works on meta models. Returns how many."""
    from aotllm.quantize.linear import QUANT_LINEARS

    cls = QUANT_LINEARS[record["scheme"]]
    kept = set(record["float_modules"])
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and n not in kept]
    modules = dict(model.named_modules())
    for name in names:
        lin = modules[name]
        if cls is W8A16Linear:
            new = cls(lin.in_features, lin.out_features, lin.ops, lin.bias, record["group_size"])
        elif cls is W8A8DynamicLinear:
            new = cls(lin.in_features, lin.out_features, lin.ops, lin.bias)
        else:  # static: the bias lives in quant_bias
            new = cls(lin.in_features, lin.out_features, lin.ops)
        _swap(model, name, new.to(lin.weight.device))
    if len(names) != record.get("quantized_linears", len(names)):
        raise ValueError(f"the quantization record lists {record['quantized_linears']} "
                         f"quantized linears but the model has {len(names)} outside its "
                         "float modules")
    return len(names)
