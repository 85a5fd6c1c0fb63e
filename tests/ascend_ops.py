"""The `npu::` ops off-device (test-only): schemas, Meta kernels, a
functionalization for the in-place scatter, and CPU reference kernels.

Schemas come verbatim from the torch-npu wheel's codegen YAML (on an NPU host
libtorch_npu.so registers the same ones). The Meta kernels give output shapes
and dtypes as the ops' documentation states them. The CPU kernels are
written from the ops' documented semantics (Ascend op docs / torch_npu API
docs), independently of `aotllm.models.ops.TorchOps`, so comparing the GE
path run eagerly against the torch path checks NpuOps's use of each op.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_LIBS: list = []  # keep the Library objects alive (dropping them unregisters)
_DEFINED: set[str] = set()

# c10::ScalarType numbers, as the `int dtype` arguments of these schemas take them.
SCALAR_TYPE = {torch.int8: 1, torch.int32: 3, torch.float16: 5, torch.float32: 6,
               torch.bfloat16: 15}
_FROM_SCALAR_TYPE = {v: k for k, v in SCALAR_TYPE.items()}


def _schemas(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    yaml_path = root / "torch_npu" / "csrc" / "aten" / "npu_native_functions_by_codegen.yaml"
    found: dict[str, str] = {}
    for line in yaml_path.read_text().splitlines():
        m = re.match(r"\s*(?:- )?func: (\w+)\((.*)$", line)
        if m and m.group(1) in names and m.group(1) not in found:
            found[m.group(1)] = f"{m.group(1)}({m.group(2)}"
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"schemas not in {yaml_path}: {sorted(missing)}")
    return found


def define_npu_ops(root: Path, names: tuple[str, ...]) -> None:
    todo = tuple(n for n in names if n not in _DEFINED and not hasattr(torch.ops.npu, n))
    if not todo:
        return
    lib = torch.library.Library("npu", "FRAGMENT")
    _LIBS.append(lib)
    for name, schema in _schemas(root, todo).items():
        lib.define(schema)
        _DEFINED.add(name)
    for name, fake in _FAKES.items():
        if name in todo:
            torch.library.register_fake(f"npu::{name}", fake, lib=lib)
    for name, kernel in _CPU.items():
        if name in todo:
            lib.impl(name, kernel, "CPU")
    if "npu_scatter_nd_update_" in todo:
        lib.impl("npu_scatter_nd_update_", _functionalize_scatter_nd_update_, "Functionalize")


# --- Meta (fake) kernels: shapes and dtypes only -----------------------------


def _fake_scatter_nd_update_(self, indices, updates):
    return self


def _fake_scatter_nd_update(self, indices, updates):
    return torch.empty_like(self)


def _fake_rms_norm(x, gamma, epsilon=1e-6):
    # rstd: float32, x's shape with gamma's (trailing) dims reduced to 1.
    rstd_shape = list(x.shape[: x.dim() - gamma.dim()]) + [1] * gamma.dim()
    return torch.empty_like(x), x.new_empty(rstd_shape, dtype=torch.float32)


def _fake_rotary(query, key, cos, sin, layout="BSND", rotary_mode="half"):
    return torch.empty_like(query), torch.empty_like(key)


def _fake_wqbmm(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                weight_dtype=None):
    return x.new_empty((*x.shape[:-1], weight.shape[-1]))


def _fake_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None,
                        quant_mode="pertoken", dst_type_max=0.0):
    return (input.new_empty(input.shape, dtype=torch.int8),
            input.new_empty(input.shape[:-1], dtype=torch.float32))


def _fake_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                       output_dtype=None, x1_dtype=None, x2_dtype=None,
                       pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                       y_scale=None):
    dtype = _FROM_SCALAR_TYPE[output_dtype] if output_dtype is not None else torch.int8
    return x1.new_empty((*x1.shape[:-1], x2.shape[-1]), dtype=dtype)


def _fake_quantize(self, scales, zero_points, dtype, axis=1, div_mode=True):
    return self.new_empty(self.shape, dtype=_FROM_SCALAR_TYPE[dtype])


def _rstd_like(x, gamma):
    return x.new_empty(list(x.shape[: x.dim() - gamma.dim()]) + [1] * gamma.dim(),
                       dtype=torch.float32)


# Ops that only torchair's fusion patterns name (their search functions are
# traced when the pattern pass runs); NpuOps's graphs never hold them.
def _fake_dtype_cast(self, dtype):
    return self.new_empty(self.shape, dtype=dtype)


def _fake_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    return torch.empty_like(x1), _rstd_like(x1, gamma), torch.empty_like(x1)


def _fake_add_rms_norm_cast(x1, x2, gamma, epsilon=1e-6):
    return (x1.new_empty(x1.shape, dtype=torch.float32), torch.empty_like(x1),
            _rstd_like(x1, gamma), torch.empty_like(x1))


def _fake_add_rms_norm_dynamic_quant(x1, x2, gamma, *, smooth_scale1=None, smooth_scale2=None,
                                     beta=None, epsilon=1e-6, output_mask=None, y_dtype=None):
    q = x1.new_empty(x1.shape, dtype=torch.int8)
    s = x1.new_empty(x1.shape[:-1], dtype=torch.float32)
    return q, torch.empty_like(q), torch.empty_like(x1), s, torch.empty_like(s)


def _fake_add_rms_norm_quant(x1, x2, gamma, scales1, zero_points1, beta=None, scales2=None,
                             zero_points2=None, *, axis=-1, epsilon=1e-6, div_mode=True,
                             dst_type=None):
    q = x1.new_empty(x1.shape, dtype=torch.int8)
    return q, torch.empty_like(q), torch.empty_like(x1)


def _fake_quant_scatter(self, indices, updates, quant_scales, quant_zero_points=None, axis=-2,
                        quant_axis=-1, reduce="update", dst_type=None, round_mode="rint"):
    return torch.empty_like(self)


def _fake_quant_scatter_(self, *args, **kwargs):
    return self


def _fake_transpose_bmm(input, weight, *, bias=None, scale=None, perm_x1=None, perm_x2=None,
                        perm_y=None, batch_split_factor=1):
    a = input.permute(perm_x1) if perm_x1 else input
    b = weight.permute(perm_x2) if perm_x2 else weight
    y = torch.matmul(a, b)
    return (y.permute(perm_y) if perm_y else y).contiguous()


def _fake_scatter_update(self, indices, updates, axis):
    return torch.empty_like(self)


def _fake_scatter_update_(self, indices, updates, axis):
    return self


_PATTERN_FAKES = {
    "_npu_dtype_cast": _fake_dtype_cast,
    "npu_add_rms_norm": _fake_add_rms_norm,
    "npu_add_rms_norm_cast": _fake_add_rms_norm_cast,
    "npu_add_rms_norm_dynamic_quant": _fake_add_rms_norm_dynamic_quant,
    "npu_add_rms_norm_quant": _fake_add_rms_norm_quant,
    "npu_quant_scatter": _fake_quant_scatter,
    "npu_quant_scatter_": _fake_quant_scatter_,
    "npu_transpose_batchmatmul": _fake_transpose_bmm,
    "scatter_update": _fake_scatter_update,
    "scatter_update_": _fake_scatter_update_,
}
PATTERN_OPS = tuple(_PATTERN_FAKES)

_FAKES = {
    "npu_scatter_nd_update_": _fake_scatter_nd_update_,
    "npu_scatter_nd_update": _fake_scatter_nd_update,
    "npu_rms_norm": _fake_rms_norm,
    "npu_apply_rotary_pos_emb": _fake_rotary,
    "npu_weight_quant_batchmatmul": _fake_wqbmm,
    "npu_dynamic_quant": _fake_dynamic_quant,
    "npu_quant_matmul": _fake_quant_matmul,
    "npu_quantize": _fake_quantize,
    **_PATTERN_FAKES,
}


def _functionalize_scatter_nd_update_(self, indices, updates):
    """In-place -> functional, as torch_npu's C++ functionalization does:
    compute the functional variant on the unwrapped tensors, then make the
    result the new value of `self` (AOTAutograd turns that into a copy_ back
    to the graph input, which torchair's recover_view_inplace pass undoes)."""
    for t in (self, indices, updates):
        torch._sync(t)
    raw = [torch._from_functional_tensor(t) for t in (self, indices, updates)]
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize)
    with torch._C._ExcludeDispatchKeyGuard(keys):
        out = torch.ops.npu.npu_scatter_nd_update(*raw)
    torch._functionalize_replace(self, out)
    torch._functionalize_commit_update(self)
    torch._sync(self)
    return self


# --- CPU reference kernels, from the documented semantics --------------------


def _scatter_nd_update_(self, indices, updates):
    # ScatterNdUpdate: self[indices[i, 0], ..., indices[i, k-1]] = updates[i]
    # (k = indices.shape[-1] leading dims of self addressed per update).
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).long()
    upd = updates.reshape(idx.shape[0], *self.shape[k:])
    for i in range(idx.shape[0]):
        self[tuple(idx[i].tolist())] = upd[i].to(self.dtype)
    return self


def _scatter_nd_update(self, indices, updates):
    return _scatter_nd_update_(self.clone(), indices, updates)


def _rms_norm(x, gamma, epsilon=1e-6):
    # RmsNorm: rstd = 1 / sqrt(mean(x^2 over gamma's dims) + eps), computed in
    # float32; y = x * rstd * gamma, cast back to x's dtype.
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def _rotary(query, key, cos, sin, layout="BSND", rotary_mode="half"):
    # ApplyRotaryPosEmb, rotary_mode "half": out = x * cos + rotate_half(x) * sin,
    # rotate_half(x) = cat(-x2, x1) for x = cat(x1, x2) along the last dim;
    # cos/sin broadcast over heads ([B, S, 1, D] in BSND). float32 inside.
    if layout != "BSND" or rotary_mode != "half":
        raise NotImplementedError(f"reference covers BSND/half, got {layout}/{rotary_mode}")

    def apply(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
        return (xf * cos.float() + rot * sin.float()).to(x.dtype)

    return apply(query), apply(key)


def _wqbmm(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
           quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
           weight_dtype=None):
    # WeightQuantBatchMatmulV2: y = x @ ((weight + offset) * scale) + bias with
    # weight [K, N] int8; scale [N] (per channel) or [K // group, N] (per group).
    w = weight.float()
    if antiquant_offset is not None:
        w = w + _expand_group(antiquant_offset.float(), antiquant_group_size, w.shape[0])
    w = w * _expand_group(antiquant_scale.float(), antiquant_group_size, w.shape[0])
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _expand_group(t, group, k):
    t = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    return t.repeat_interleave(group, dim=0)[:k] if group > 0 else t


def _dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None,
                   quant_mode="pertoken", dst_type_max=0.0):
    # DynamicQuant (per token, symmetric int8): scale = max|x| / 127 per row,
    # y = round(x / scale). Returns (y int8, scale float32 [rows]).
    xf = input.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    y = torch.round(xf / scale.unsqueeze(-1).clamp(min=1e-30)).clamp(-128, 127)
    return y.to(torch.int8), scale


def _quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                  output_dtype=None, x1_dtype=None, x2_dtype=None,
                  pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None,
                  y_scale=None):
    # QuantBatchMatmulV3: acc = x1 @ x2 (int8 x int8 -> int32) + bias (int32);
    # y = acc * scale [N] (* pertoken_scale [M]), cast to output_dtype.
    acc = x1.long() @ x2.long()  # exact
    if bias is not None and bias.dtype == torch.int32:
        acc = acc + bias.long()
    y = acc.double() * scale.double()
    if pertoken_scale is not None:
        y = y * pertoken_scale.double().unsqueeze(-1)
    if bias is not None and bias.dtype != torch.int32:
        y = y + bias.double()
    return y.to(_FROM_SCALAR_TYPE[output_dtype] if output_dtype is not None else torch.int8)


def _quantize(self, scales, zero_points, dtype, axis=1, div_mode=True):
    # AscendQuantV2 (div_mode False): y = round(x * scale + offset), saturated
    # to the target integer type.
    xf = self.float()
    y = xf / scales.float() if div_mode else xf * scales.float()
    if zero_points is not None:
        y = y + zero_points.float()
    return torch.round(y).clamp(-128, 127).to(_FROM_SCALAR_TYPE[dtype])


_CPU = {
    "npu_scatter_nd_update_": _scatter_nd_update_,
    "npu_scatter_nd_update": _scatter_nd_update,
    "npu_rms_norm": _rms_norm,
    "npu_apply_rotary_pos_emb": _rotary,
    "npu_weight_quant_batchmatmul": _wqbmm,
    "npu_dynamic_quant": _dynamic_quant,
    "npu_quant_matmul": _quant_matmul,
    "npu_quantize": _quantize,
}


# --- torchair's air::npu_fused_infer_attention_score --------------------------


def fused_infer_attention_score(query, key, value, *, atten_mask=None,
                                actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                block_table=None, num_heads=1, scale=1.0,
                                input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
                                block_size=0, softmax_lse_flag=False, **unused):
    """FusedInferAttentionScore in page-attention mode (the subset NpuOps uses).

    query [B, S, N, D] (BSND); key/value [num_blocks, block_size, Nkv * D]:
    row b's keys are its blocks `block_table[b]` concatenated, the first
    `actual_seq_lengths_kv[b]` of them valid. sparse_mode 0: every valid key
    is visible; sparse_mode 3 (rightDownCausal, with the 2048x2048 mask): the
    row's `actual_seq_lengths[b]` queries are the last ones of its keys, query
    i sees key j iff j <= i + kv_len - q_len. Query rows past q_len give 0.
    Head n reads KV head n // (N / Nkv); softmax in float32.
    """
    if input_layout != "BSND" or block_table is None:
        raise NotImplementedError("reference covers paged BSND only")
    if sparse_mode not in (0, 3):
        raise NotImplementedError(f"reference covers sparse_mode 0 and 3, got {sparse_mode}")
    for name, v in unused.items():
        if v is not None and name not in ("pre_tokens", "next_tokens", "inner_precise",
                                          "antiquant_mode", "key_antiquant_mode",
                                          "value_antiquant_mode"):
            raise NotImplementedError(f"reference does not cover {name}")
    b, s, n, d = query.shape
    nkv = num_key_value_heads or n
    out = torch.zeros_like(query)
    for row in range(b):
        kv_len = int(actual_seq_lengths_kv[row])
        q_len = int(actual_seq_lengths[row]) if actual_seq_lengths is not None else s
        blocks = block_table[row].long()
        k = key[blocks].reshape(-1, nkv, d)[:kv_len].float()  # [L, Nkv, D]
        v = value[blocks].reshape(-1, nkv, d)[:kv_len].float()
        k = k.repeat_interleave(n // nkv, dim=1)
        v = v.repeat_interleave(n // nkv, dim=1)
        q = query[row, :q_len].float()  # [q_len, N, D]
        scores = torch.einsum("qnd,knd->nqk", q, k) * scale
        if sparse_mode == 3:
            qi = torch.arange(q_len).view(-1, 1)
            kj = torch.arange(kv_len).view(1, -1)
            scores = scores.masked_fill(kj > qi + (kv_len - q_len), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[row, :q_len] = torch.einsum("nqk,knd->qnd", probs, v).to(query.dtype)
    return out, query.new_empty((1,), dtype=torch.float32)


def register_air_reference() -> None:
    """torchair registers a CPU kernel for its air:: op that raises (it only
    runs inside GE); the tests replace it with the reference above."""
    import warnings

    lib = torch.library.Library("air", "IMPL")
    _LIBS.append(lib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("npu_fused_infer_attention_score", fused_infer_attention_score, "CPU")
