"""The decoder every family shares: attention on the ops layer, MLP (gated or
not, or routed experts), norms, and the three residual layouts the families
use. A family's file (models/<family>.py) says only what differs: its config
parser and its checkpoint names (`CausalLM.weight_map`).

Module and parameter names follow transformers' Llama (`model.layers.N...`)
except that q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`),
as vLLM does: one matmul instead of three (two) per layer. Each fused linear
knows its shards (`MergedLinear`), and the weight map puts every checkpoint
tensor into its rows (models/weights.py).

`forward` takes exactly the graph signature of DESIGN.md; nothing reaches it
through globals, so the same module is run eagerly, exported per bucket, or
handed to torchair.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.activations import ACT2FN

from aotllm.models.config import ModelConfig
from aotllm.models.layers import Embedding, LayerNorm, Linear, MergedLinear, RMSNorm
from aotllm.models.ops import TorchOps
from aotllm.models.parallel import Split, TensorParallel, row_index
from aotllm.models.rope import rope_inv_freq, rotary_dim
from aotllm.models.weights import Shard, WeightMap


def make_norm(config: ModelConfig, size: int, ops, dtype: torch.dtype) -> nn.Module:
    if config.norm == "layer":
        return LayerNorm(size, config.rms_norm_eps, dtype)
    return RMSNorm(size, config.rms_norm_eps, ops, dtype)


def _norm_tensors(norm: nn.Module) -> list[torch.Tensor]:
    return [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]


class Attention(nn.Module):
    """Under tensor parallelism this rank's heads only (models/parallel.py):
    q/k/v column-parallel, o_proj row-parallel and summed by one all-reduce."""

    def __init__(self, config: ModelConfig, layer_idx: int, ops, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.ops = ops
        self.tp = tp
        self.q_start, self.num_heads = tp.even(config.num_heads, "num_attention_heads")
        self.kv_start, self.num_kv_heads = tp.kv_heads(config.num_heads, config.num_kv_heads)
        self.full_heads = (config.num_heads, config.num_kv_heads)
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_windows[layer_idx]
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size,
            (("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size)),
            config.qkv_bias, ops, dtype,
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_bias, ops, dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype)
        else:
            self.q_norm = self.k_norm = None

    def tp_splits(self, prefix: str) -> dict[str, Split]:
        d = self.head_dim
        q_full, kv_full = (h * d for h in self.full_heads)
        rows = Split(0, row_index([
            (0, self.q_start * d, self.q_size),
            (q_full, self.kv_start * d, self.kv_size),
            (q_full + kv_full, self.kv_start * d, self.kv_size),
        ]))
        cols = torch.arange(self.q_start * d, self.q_start * d + self.q_size, device="cpu")
        return {f"{prefix}.qkv_proj.weight": rows, f"{prefix}.qkv_proj.bias": rows,
                f"{prefix}.o_proj.weight": Split(1, cols),
                f"{prefix}.o_proj.bias": Split(additive=True)}

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
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.rotary(q, k, cos, sin)
        self.ops.write_kv(kv_cache, k, v, slot_mapping)
        out = self.ops.paged_attention(
            q, kv_cache, block_tables, positions, context_lens, query_lens, self.scale,
            self.sliding_window,
        )
        out = self.o_proj(out.reshape(b, t, self.q_size))
        return self.ops.all_reduce(out) if self.tp.enabled else out


class MLP(nn.Module):
    """down(act(gate) * up), or down(act(up)) when the family's MLP has no gate."""

    def __init__(self, config: ModelConfig, ops, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel(), intermediate_size: int | None = None):
        super().__init__()
        self.ops = ops
        self.tp = tp
        self.full_intermediate = intermediate_size or config.intermediate_size
        self.start, i = tp.even(self.full_intermediate, "intermediate_size")
        self.intermediate_size = i
        h, bias = config.hidden_size, config.mlp_bias
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_up_proj = MergedLinear(
                h, (("gate_proj", i), ("up_proj", i)), bias, ops, dtype)
        else:
            self.up_proj = Linear(h, i, bias, ops, dtype)
        self.down_proj = Linear(i, h, bias, ops, dtype)
        self.act = ACT2FN[config.hidden_act]

    @property
    def in_proj(self) -> Linear:
        return self.gate_up_proj if self.gated else self.up_proj

    def tp_splits(self, prefix: str) -> dict[str, Split]:
        full, a, n = self.full_intermediate, self.start, self.intermediate_size
        pieces = [(0, a, n), (full, a, n)] if self.gated else [(0, a, n)]
        name = "gate_up_proj" if self.gated else "up_proj"
        rows = Split(0, row_index(pieces))
        return {f"{prefix}.{name}.weight": rows, f"{prefix}.{name}.bias": rows,
                f"{prefix}.down_proj.weight": Split(1, torch.arange(a, a + n, device="cpu")),
                f"{prefix}.down_proj.bias": Split(additive=True)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            out = self.down_proj(self.act(self.up_proj(x)))
        else:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            out = self.down_proj(self.act(gate) * up)
        return self.ops.all_reduce(out) if self.tp.enabled else out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.kind = config.layer_kind
        h = config.hidden_size
        self.self_attn = Attention(config, layer_idx, ops, dtype, tp)
        if config.num_experts and layer_idx not in config.dense_layers:
            from aotllm.models.moe import SparseMoE

            self.mlp = SparseMoE(config, ops, dtype, tp)
        else:
            self.mlp = MLP(config, ops, dtype, tp)
        self.input_layernorm = make_norm(config, h, ops, dtype)
        # Parallel layers read one norm (or, Falcon's new decoder, one per branch).
        if self.kind != "parallel" or config.parallel_norms == 2:
            self.post_attention_layernorm = make_norm(config, h, ops, dtype)
        else:
            self.post_attention_layernorm = None
        if self.kind == "sandwich":
            self.post_self_attn_layernorm = make_norm(config, h, ops, dtype)
            self.post_mlp_layernorm = make_norm(config, h, ops, dtype)

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
        x = self.input_layernorm(h)
        a = self.self_attn(
            x, cos, sin, kv_cache, slot_mapping, block_tables, positions, context_lens, query_lens,
        )
        if self.kind == "parallel":
            mlp_in = x if self.post_attention_layernorm is None else self.post_attention_layernorm(h)
            return h + a + self.mlp(mlp_in)
        if self.kind == "sandwich":
            h = h + self.post_self_attn_layernorm(a)
            return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))

    def smoothing_groups(self) -> list[tuple[list[torch.Tensor], list[Linear]]]:
        """Where a per-channel scale can move between tensors (SmoothQuant):
        (tensors whose dim 0 makes channel c of an activation, the linears that
        are the only readers of that activation). Dividing the former's rows by
        s and multiplying the latter's input columns by s leaves the layer's
        output unchanged: norms scale their output (weight and bias), and
        down_proj's input is act(gate) * up, linear in up's rows. Routed
        experts are not linears (they stay float), so their inputs are left."""
        qkv = self.self_attn.qkv_proj
        dense = isinstance(self.mlp, MLP)
        if self.post_attention_layernorm is None:  # one norm feeds both branches
            readers = [qkv] + ([self.mlp.in_proj] if dense else [])
            groups = [(_norm_tensors(self.input_layernorm), readers)]
        else:
            groups = [(_norm_tensors(self.input_layernorm), [qkv])]
            if dense:
                groups.append((_norm_tensors(self.post_attention_layernorm), [self.mlp.in_proj]))
        # A MoE layer's shared expert is a dense MLP, inside which up -> down folds too.
        mlp = self.mlp if dense else getattr(self.mlp, "shared_expert", None)
        if mlp is not None and mlp.gated:
            i = mlp.intermediate_size
            gate_up = mlp.gate_up_proj
            up = [gate_up.weight[i:]] + ([gate_up.bias[i:]] if gate_up.bias is not None else [])
            groups.append((up, [mlp.down_proj]))
        return groups


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, ops, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, ops, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, ops, dtype, tp) for i in range(config.num_layers)
        )
        self.norm = make_norm(config, config.hidden_size, ops, dtype)


class CausalLM(nn.Module):
    """A decoder-only LM whose forward is the aotllm graph signature.

    A family subclasses it only to name its checkpoint's tensors: `renames`
    (regex, replacement) rewrite the names of the Llama-shaped modules, and
    `weight_map` may regroup shards (e.g. one grouped `wqkv` tensor)."""

    renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, config: ModelConfig, dtype: torch.dtype, ops=TorchOps,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.ops = ops
        self.tp = tp
        self.model = DecoderModel(config, ops, dtype, tp)
        # Vocab-parallel under TP: this rank's rows of the (padded) vocabulary.
        head_rows = tp.vocab(config.vocab_size)[1] if tp.enabled else config.vocab_size
        self.lm_head = Linear(config.hidden_size, head_rows, False, ops, dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling, self.dynamic_rope = rope_inv_freq(config)
        # Rotary pairs sit at (i, i + head_dim / 2); dims a partial rotary leaves
        # alone get frequency 0, so cos 1 and sin 0 pass them through unchanged.
        self.rotary_pad = config.head_dim // 2 - rotary_dim(config) // 2
        if self.rotary_pad and self.rope_scaling != 1.0:
            raise ValueError("partial rotary with an attention-scaling rope type is not supported")
        # Not persistent: derived from the config, not a checkpoint tensor.
        self.register_buffer("inv_freq", self._pad(inv_freq), persistent=False)
        # Plain data, built while every linear is still float: the quantized
        # modules that replace linears later keep the same checkpoint names.
        self.weight_map: WeightMap = self.build_weight_map()

    def _pad(self, inv_freq: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(inv_freq, (0, self.rotary_pad))

    def checkpoint_name(self, name: str) -> str:
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name

    def regroup(self, weight_map: WeightMap) -> None:
        """A family's changes to the map in the model's own names (before
        `renames`): fused tensors the checkpoint stores whole, reordered rows."""

    def tp_splits(self) -> dict[str, Split]:
        """Parameter name -> this rank's part of the full tensor (models/parallel.py)."""
        if not self.tp.enabled:
            return {}
        start, rows = self.tp.vocab(self.config.vocab_size)
        index = torch.arange(start, start + rows, device="cpu")
        vocab = Split(0, index.masked_fill(index >= self.config.vocab_size, -1))
        out = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
        for prefix, module in self.named_modules():
            if hasattr(module, "tp_splits") and module is not self:
                out.update(module.tp_splits(prefix))
        return out

    def build_weight_map(self) -> WeightMap:
        """Checkpoint tensor name -> where it goes, for every parameter. Under
        TP, the full model's map with each shard cut to this rank's part, so
        every family's regrouping and reordering applies unchanged."""
        if self.tp.enabled:
            with torch.device("meta"):
                full = type(self)(self.config, self.dtype, self.ops)
            splits = self.tp_splits()
            return {name: shard.for_rank(splits.get(shard.param), self.tp.rank)
                    for name, shard in full.weight_map.items()}
        out: WeightMap = {}
        tied = self.config.tie_word_embeddings
        for prefix, module in self.named_modules():
            if hasattr(module, "weight_shards"):
                shards = module.weight_shards(prefix)
            else:
                shards = {f"{prefix}.{attr}": Shard(f"{prefix}.{attr}")
                          for attr, _ in module.named_parameters(recurse=False)}
            for name, shard in shards.items():
                if not (tied and name == "lm_head.weight"):
                    out[name] = shard
        self.regroup(out)
        return {self.checkpoint_name(name): shard for name, shard in out.items()}

    def ignored_checkpoint_tensors(self) -> frozenset[str]:
        """Checkpoint names that carry nothing to load (a tied head's copy)."""
        if self.config.tie_word_embeddings:
            return frozenset({self.checkpoint_name("lm_head.weight")})
        return frozenset()

    def rotary_cos_sin(self, positions: torch.Tensor,
                       context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 angles as transformers computes them, then cast to the model dtype.
        if self.dynamic_rope is not None:
            inv_freq = self._pad(self.dynamic_rope.inv_freq(context_lens)).unsqueeze(1)
        else:
            inv_freq = self.inv_freq
        freqs = positions.float().unsqueeze(-1) * inv_freq
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
        cos, sin = self.rotary_cos_sin(positions, context_lens)
        h = self.model.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h = layer(h, kv_cache, cos, sin, slot_mapping, block_tables, positions, context_lens,
                      query_lens)
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, query_lens - 1]
        logits = self.lm_head(self.model.norm(last))
        if self.tp.enabled:  # each rank has its vocabulary slice; all of them, padding cut
            logits = self.ops.all_gather(logits, -1)[:, : self.config.vocab_size]
        return logits.float()
