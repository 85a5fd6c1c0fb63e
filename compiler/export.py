"""torch.export of the decoder at one bucket's static shapes.

Every input of the graph signature gets the bucket's exact shape except the
KV caches' `num_blocks` dimension, which stays dynamic: the serving host picks
the cache size from its own memory budget at load time, and one artifact must
serve any cache size.
"""

from __future__ import annotations

import torch
from torch.export import Dim

from aotllm.compiler.shape_groups import ShapeGroup, example_bucket_and_dims
from aotllm.compiler.shape_groups import dynamic_shapes as group_dynamic_shapes
from aotllm.graphs.buckets import Bucket
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.models.decoder import CausalLM


def _example_num_blocks(bucket: Bucket, spec: KVCacheSpec) -> int:
    """A small example cache size that equals no other dimension: export would
    otherwise unify two equal sizes and specialise the dynamic one. Small,
    because the example caches are real tensors (a long-context bucket's
    B * MAXB blocks would take gigabytes)."""
    taken = {bucket.batch, bucket.tokens, bucket.context_blocks, bucket.batch * bucket.tokens,
             spec.block_size, spec.num_kv_heads, spec.head_dim, 2}
    n = 3
    while n in taken:
        n += 1
    return n


def example_inputs(
    bucket: Bucket, spec: KVCacheSpec, dtype: torch.dtype, device: torch.device
) -> tuple:
    b, t, maxb, bs = bucket.batch, bucket.tokens, bucket.context_blocks, spec.block_size
    nb = _example_num_blocks(bucket, spec)
    long = dict(dtype=torch.int64, device=device)
    positions = torch.arange(t, **long).expand(b, t).contiguous()
    slot_mapping = (bs + torch.arange(b * t, **long)) % (nb * bs)
    block_tables = torch.arange(b * maxb, **long).view(b, maxb) % nb
    context_lens = torch.full((b,), t, **long)
    query_lens = torch.full((b,), t, **long)
    kv_caches = [
        torch.zeros(spec.layer_shape(nb), dtype=dtype, device=device)
        for _ in range(spec.num_layers)
    ]
    input_ids = torch.zeros(b, t, **long)
    return (input_ids, positions, slot_mapping, block_tables, context_lens, query_lens, kv_caches)


def export_bucket(
    model: CausalLM, bucket: Bucket, spec: KVCacheSpec, device: torch.device,
    group: ShapeGroup | None = None,
) -> torch.export.ExportedProgram:
    """One bucket's graph, or with `group` one graph for all of its buckets
    (dynamic over their batch, token and context sizes; compiler/shape_groups.py)."""
    num_blocks = Dim("num_blocks", min=2)
    if group is None:
        args = example_inputs(bucket, spec, model.dtype, device)
        dynamic_shapes = (None, None, None, None, None, None,
                          [{1: num_blocks}] * spec.num_layers)
    else:
        example, dims = example_bucket_and_dims(group, spec)
        args = example_inputs(example, spec, model.dtype, device)
        dynamic_shapes = group_dynamic_shapes(example, dims, spec.num_layers, num_blocks)
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
