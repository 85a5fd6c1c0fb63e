"""Quantize / dequantize primitives (pure tensor functions, no modules)."""

from __future__ import annotations

import torch

QMAX = 127  # symmetric int8: [-127, 127], so negation never overflows


def quantize_weight(w: torch.Tensor, group_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights: (q [out, in] int8, scale float32 [out] or [out, in/group]).

    A zero (or constant-zero) channel gets scale 1, so dequantizing it gives
    exact zeros rather than NaN.
    """
    out_f, in_f = w.shape
    wf = w.detach().float()
    if group_size is not None:
        if in_f % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide the input size {in_f}; "
                "choose a divisor or no group size"
            )
        wf = wf.view(out_f, in_f // group_size, group_size)
    amax = wf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(wf / scale.unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)
    return q.view(out_f, in_f), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights from `quantize_weight`'s output (grouped if scale is 2-D)."""
    out_f, in_f = q.shape
    if scale.dim() == 1:
        return q.float() * scale.float().unsqueeze(-1)
    groups = scale.shape[1]
    return (q.view(out_f, groups, in_f // groups).float() * scale.float().unsqueeze(-1)).view(out_f, in_f)


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s = max|X|^alpha / max|W|^(1-alpha).

    Activations are divided by s (folded into the preceding norm) and weight
    columns multiplied by it, which moves outliers from X into W.
    """
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return s.clamp(min=1e-5)
