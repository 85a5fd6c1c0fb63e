"""The Ascend implementation of the ops protocol (`models.ops.Ops`).

Every primitive is one torch_npu / torchair op that torchair converts to a GE
operator; GE has no converter for `index_put`/`index_copy` or SDPA, so the KV
write and attention cannot fall back to the torch versions. The ops are
looked up on `torch.ops.npu` / `torch.ops.air` at call time (that is, while
torch.compile traces): importing this module needs neither torch_npu nor
torchair, and the model code stays the same for every backend.

Verified off-device (tests/test_ascend_ge.py): torchair 2.13.0's conversion
of these calls to GE IR, and their numerics run eagerly against CPU
reference kernels written from the ops' documentation. Not verified here:
the NPU kernels themselves (needs an Ascend host with CANN).

What the families beyond Llama add goes through torchair's aten converters,
not through this layer (checked off-device for one 1-layer config per family):
LayerNorm with bias (Falcon) is `F.layer_norm` in models/layers.py, converted
to LayerNormV4; a partial rotary (GLM) is the full-width rotate-half op with
frequency 0 on the pass-through pairs, so cos 1 / sin 0 leave them as they
are; dynamic rope computes inv_freq from context_lens with plain arithmetic;
the MoE router (softmax, top-k), the gathered experts (index into the frozen
stacks, batched matmuls) and the all-experts prefill are plain ops too. No
fused NPU MoE kernel (npu_moe_gating_top_k_softmax, npu_grouped_matmul) is
used: that would be a speed change, and one this host cannot check.

Weight layout: the NPU matmuls take int8 weights as [in, out] (K, N), the
transpose of msModelSlim's [out, in]. `to_npu_weight_layout(model)` relayouts
a quantized model's buffers once, before compile; NpuOps expects that layout.

Tensor parallel on NPU uses HCCL (graphs/devices.py DISTRIBUTED_BACKENDS);
torchair converts the c10d functional collectives to GE's HCOM ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aotllm.models.ops import all_gather, all_reduce

# FusedInferAttentionScore's causal mode for prefill: sparse_mode 3
# ("rightDownCausal") takes this fixed 2048 x 2048 mask (1 = masked) and
# aligns the row's queries to the end of its keys, which is chunked prefill.
_CAUSAL_MASK_SIZE = 2048
_SPARSE_NONE, _SPARSE_RIGHT_DOWN_CAUSAL = 0, 3

# c10::ScalarType codes: the torch_npu schemas take dtypes as `int`.
_SCALAR_TYPE = {torch.int8: 1, torch.int32: 3, torch.float16: 5, torch.float32: 6,
                torch.bfloat16: 15}


def _npu_op(name: str):
    try:
        return getattr(torch.ops.npu, name)
    except AttributeError:
        raise RuntimeError(
            f"torch.ops.npu.{name} is not registered: NpuOps needs torch_npu "
            "imported (an Ascend host with CANN)"
        ) from None


def _fused_infer_attention_score():
    # torchair's own definition of the op (air::): unlike npu:: it takes the
    # sequence lengths as tensors, so one graph serves every length.
    try:
        return torch.ops.air.npu_fused_infer_attention_score
    except AttributeError:
        raise RuntimeError(
            "torch.ops.air.npu_fused_infer_attention_score is not registered: "
            "import torchair.ops._npu_fused_infer_attention_score first (the GE backend does)"
        ) from None


def causal_mask(device: torch.device) -> torch.Tensor:
    """The mask sparse_mode 3 wants: [2048, 2048] bool, True above the diagonal."""
    i = torch.arange(_CAUSAL_MASK_SIZE, device=device)
    return i.view(1, -1) > i.view(-1, 1)


class NpuOps:
    name = "npu"

    @staticmethod
    def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        # One ScatterNdUpdate per layer over both halves viewed as
        # [2 * num_blocks * block_size, Hkv, D]: values live num_blocks *
        # block_size slots after their keys.
        two, nb, bs, h, d = kv_cache.shape
        flat = kv_cache.view(two * nb * bs, h, d)
        slots = slot_mapping.view(-1)
        indices = torch.cat((slots, slots + nb * bs)).view(-1, 1)
        updates = torch.cat((k.reshape(-1, h, d), v.reshape(-1, h, d))).to(kv_cache.dtype)
        _npu_op("npu_scatter_nd_update_")(flat, indices, updates)

    @staticmethod
    def paged_attention(
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        context_lens: torch.Tensor,
        query_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        if sliding_window is not None:
            # FusedInferAttentionScore has a band mode (sparse_mode 4 with
            # pre_tokens), not wired up or verified here yet.
            raise NotImplementedError("sliding-window attention is not implemented for NpuOps")
        b, t, hq, d = q.shape
        _, nb, bs, hkv, _ = kv_cache.shape
        # Paged K/V as [num_blocks, block_size, Hkv * D] (FIA's paged BSH
        # form): views of the cache, no copy.
        key = kv_cache[0].view(nb, bs, hkv * d)
        value = kv_cache[1].view(nb, bs, hkv * d)
        kwargs = dict(
            block_table=block_tables.to(torch.int32),
            actual_seq_lengths_kv=context_lens,
            num_heads=hq,
            num_key_value_heads=hkv,
            scale=scale,
            input_layout="BSND",
            block_size=bs,
        )
        if t > 1:
            # Prefill (possibly a chunk after cached tokens): causal, queries
            # aligned to the end of the row's context_lens keys.
            kwargs.update(actual_seq_lengths=query_lens, atten_mask=causal_mask(q.device),
                          sparse_mode=_SPARSE_RIGHT_DOWN_CAUSAL)
        else:
            kwargs.update(sparse_mode=_SPARSE_NONE)
        out, _ = _fused_infer_attention_score()(q, key, value, **kwargs)
        return out

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return _npu_op("npu_rms_norm")(x, weight, eps)[0]

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rotate-half ("half" mode), q/k [B, T, N, D], cos/sin [B, T, 1, D].
        # The GE op writes into its inputs; torchair's converter moves them
        # first, so the functional schema holds.
        q_out, k_out = _npu_op("npu_apply_rotary_pos_emb")(
            q.contiguous(), k.contiguous(), cos.unsqueeze(2), sin.unsqueeze(2), "BSND", "half")
        return q_out, k_out

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """qweight [K, N] int8; scale [N] or [K // group, N] in x's dtype."""
        _check_kn(x, qweight)
        group = 0 if scale.dim() == 1 else qweight.shape[0] // scale.shape[0]
        out = _npu_op("npu_weight_quant_batchmatmul")(
            x.reshape(-1, x.shape[-1]), qweight, scale.to(x.dtype), antiquant_group_size=group)
        out = out.view(*x.shape[:-1], qweight.shape[1])
        return out if bias is None else out + bias

    @staticmethod
    def linear_w8a8_dynamic(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
        """Per-token int8 (DynamicQuant) x qweight [K, N] (QuantBatchMatmulV3)."""
        _check_kn(x, qweight)
        xq, x_scale = _npu_op("npu_dynamic_quant")(x.reshape(-1, x.shape[-1]))
        out = _npu_op("npu_quant_matmul")(
            xq, qweight, scale.float(), pertoken_scale=x_scale,
            output_dtype=_SCALAR_TYPE[x.dtype])
        out = out.view(*x.shape[:-1], qweight.shape[1])
        return out if bias is None else out + bias

    @staticmethod
    def linear_w8a8_static(x: torch.Tensor, qweight: torch.Tensor, input_scale: torch.Tensor,
                           input_offset: torch.Tensor, quant_bias: torch.Tensor,
                           deq_scale: torch.Tensor) -> torch.Tensor:
        """AscendQuantV2 (x * 1/scale + offset) then QuantBatchMatmulV3 with the
        int32 quant_bias and the per-channel dequant scale."""
        _check_kn(x, qweight)
        x2 = x.reshape(-1, x.shape[-1])
        # Multiply-mode quantize, as vllm-ascend calls it; the reciprocal is
        # of a frozen weight, so GE folds it at compile time. In multiply
        # mode torch_npu documents scales and offsets in the input's dtype,
        # hence bf16 here: the rounded reciprocal shifts codes on rounding
        # edges only (measured: no larger divergence than an fp32 scale).
        xq = _npu_op("npu_quantize")(
            x2, (1.0 / input_scale.float()).to(x.dtype), input_offset.to(x.dtype),
            _SCALAR_TYPE[torch.int8], -1, False)
        out = _npu_op("npu_quant_matmul")(
            xq, qweight, deq_scale.float(), bias=quant_bias, output_dtype=_SCALAR_TYPE[x.dtype])
        return out.view(*x.shape[:-1], qweight.shape[1])

    # torchair converts the functional collectives to HCCL (DESIGN.md).
    all_reduce = staticmethod(all_reduce)
    all_gather = staticmethod(all_gather)


def _check_kn(x: torch.Tensor, qweight: torch.Tensor) -> None:
    if qweight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"NpuOps wants int8 weights as [in, out]; got {tuple(qweight.shape)} for "
            f"inputs of width {x.shape[-1]} (apply npu_ops.to_npu_weight_layout first)"
        )


def to_npu_weight_layout(model: torch.nn.Module) -> int:
    """Transposes every quantized linear's int8 `weight` (and grouped w8a16
    scales) from [out, in] to the [in, out] the NPU matmuls read, in place,
    once; returns how many modules changed. Marks each module so a second
    call is a no-op."""
    from aotllm.quantize.linear import QUANT_LINEARS

    kinds = tuple(QUANT_LINEARS.values())
    changed = 0
    for module in model.modules():
        if not isinstance(module, kinds) or getattr(module, "npu_weight_layout", False):
            continue
        module.weight = module.weight.t().contiguous()
        scale = getattr(module, "weight_scale", None)
        if scale is not None and scale.dim() == 2:
            module.weight_scale = scale.t().contiguous()
        module.npu_weight_layout = True
        changed += 1
    return changed


# --- what the GE compiler and the GE runtime loader share -------------------
# (here, not in compiler/ge.py: runtime/ never imports compiler/)

# torchair's compiled-graph caches, one directory per graph and KV size,
# beside graphs/ (the pipeline keeps only graph files in graphs/).
GE_CACHE_DIR = "ge_cache"


def import_torchair_ops():
    """torchair, with its own air:: attention op registered (torchair.ops
    imports it lazily). Assumes torchair is importable: on an Ascend host
    after `import torch_npu`, in the tests through their harness."""
    import torchair
    import torchair.ops._npu_fused_infer_attention_score  # noqa: F401  (registers air::)

    return torchair


def ge_compiler_config(torchair, *, run_eagerly: bool = False):
    """max-autotune (GE graphs) with frozen parameters, as vllm-ascend's
    TorchAir graph mode ran by default (`enable_frozen_parameter`): weights
    become constant-address inputs that GE can fold and skips per step."""
    cfg = torchair.CompilerConfig()
    cfg.mode = "max-autotune"
    cfg.experimental_config.frozen_parameter = True
    # The KV cache is written in the graph, not returned and copied back
    # (torchair's default, stated because the runtime relies on it).
    cfg.experimental_config.keep_inference_input_mutations = True
    cfg.debug.run_eagerly = run_eagerly
    return cfg


def freeze_buffers(model: torch.nn.Module) -> int:
    """Re-registers every buffer as `nn.Parameter(requires_grad=False)` under
    its own name; returns how many changed.

    torchair's `frozen_parameter` freezes graph inputs that are nn.Parameters
    (it checks the input's type); the quantized linears keep their int8
    weights and scales as buffers, and `inv_freq` is one too, so without this
    they would be per-step runtime inputs instead of constant-address ones.
    Done here, not in quantize/: only this backend needs it. The names, hence
    the weights file and its aliases, stay the same (the weights file lists
    buffers and parameters alike); a tensor shared by several modules becomes
    one Parameter, so ties stay ties.
    """
    made: dict[int, torch.nn.Parameter] = {}
    changed = 0
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            param = made.get(id(buf))
            if param is None:
                param = made[id(buf)] = torch.nn.Parameter(buf, requires_grad=False)
            del module._buffers[name]
            module._non_persistent_buffers_set.discard(name)
            module.register_parameter(name, param)
            changed += 1
    return changed


def prepare(model: torch.nn.Module) -> None:
    """The weight layout the NPU ops read, then every constant frozen-able;
    both idempotent, so every entry point calls it."""
    to_npu_weight_layout(model)
    freeze_buffers(model)
