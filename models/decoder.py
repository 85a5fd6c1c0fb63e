"""The Llama-style decoder shared by the Llama, Qwen2 and Mistral families.

Module and parameter names follow transformers (`model.layers.N.self_attn...`)
except that q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`),
as vLLM does: one matmul instead of three (two) per layer. The loader maps the
checkpoint's separate tensors into slices of the fused ones.

`forward` takes exactly the graph signature of DESIGN.md; nothing reaches it
through globals, so the same module is run eagerly, exported per bucket, or
handed to torchair.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from aotllm.models.config import ModelConfig
from aotllm.models.layers import Embedding, Linear, RMSNorm
from aotllm.models.ops import TorchOps
from aotllm.models.rope import rope_inv_freq


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer_idx]
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias, ops, dtype
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_bias, ops, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        context_lens: torch.Tensor,
        query_lens: torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = self.ops.rotary(q, k, cos, sin)
        self.ops.write_kv(kv_cache, k, v, slot_mapping)
        out = self.ops.paged_attention(
            q, kv_cache, block_tables, positions, context_lens, query_lens, self.scale,
            self.sliding_window,
        )
        return self.o_proj(out.reshape(b, t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, ops, dtype: torch.dtype):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, ops, dtype
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias, ops, dtype)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, ops, dtype)
        self.mlp = MLP(config, ops, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)

    def forward(
        self,
        h: torch.Tensor,
        kv_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        context_lens: torch.Tensor,
        query_lens: torch.Tensor,
    ) -> torch.Tensor:
        a = self.self_attn(
            self.input_layernorm(h),
            cos, sin, kv_cache, slot_mapping, block_tables, positions, context_lens, query_lens,
        )
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))

    def smoothing_groups(self) -> list[tuple[list[torch.Tensor], list[Linear]]]:
        """Where a per-channel scale can move between tensors (SmoothQuant):
        (tensors whose dim 0 makes channel c of an activation, the linears that
        are the only readers of that activation). Dividing the former's rows by
        s and multiplying the latter's input columns by s leaves the layer's
        output unchanged: norms scale their output, and down_proj's input is
        act(gate) * up, linear in up's rows."""
        mlp = self.mlp.gate_up_proj
        i = self.mlp.intermediate_size
        up = [mlp.weight[i:]] + ([mlp.bias[i:]] if mlp.bias is not None else [])
        return [
            ([self.input_layernorm.weight], [self.self_attn.qkv_proj]),
            ([self.post_attention_layernorm.weight], [self.mlp.gate_up_proj]),
            (up, [self.mlp.down_proj]),
        ]


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, ops, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, ops, dtype) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)


class CausalLM(nn.Module):
    """A decoder-only LM whose forward is the aotllm graph signature."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, ops=TorchOps):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = DecoderModel(config, ops, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, ops, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling = rope_inv_freq(config)
        # Not persistent: derived from the config, not a checkpoint tensor.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles as transformers computes them, then cast to the model dtype.
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(self.dtype)
        sin = (emb.sin() * self.rope_scaling).to(self.dtype)
        return cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        positions: torch.Tensor,  # [B, T] int64
        slot_mapping: torch.Tensor,  # [B*T] int64
        block_tables: torch.Tensor,  # [B, MAXB] int64
        context_lens: torch.Tensor,  # [B] int64
        query_lens: torch.Tensor,  # [B] int64, valid tokens per row (>= 1)
        kv_caches: list[torch.Tensor],  # per layer, mutated in place
    ) -> torch.Tensor:  # [B, vocab] float32: logits of each row's last valid token
        cos, sin = self.rotary_cos_sin(positions)
        h = self.model.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h = layer(h, kv_cache, cos, sin, slot_mapping, block_tables, positions, context_lens,
                      query_lens)
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, query_lens - 1]
        return self.lm_head(self.model.norm(last)).float()
