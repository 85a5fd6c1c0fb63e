"""Where a compiled decode step's time goes, kernel by kernel.

Compiles one decode bucket of a checkpoint with Inductor's per-kernel
profiling hooks (`cpp.enable_kernel_profile`), runs it on a KV cache of the
bucket's size, and prints torch.profiler's table: extern matmuls
(`aoti_torch_cpu_mm_out`, `..._bmm_out`) next to Inductor's fused kernels.
Not a test; run it on an idle machine.

    python scripts/profile_decode.py CHECKPOINT_DIR [--batch 8] [--context 256] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256, help="tokens, a multiple of --block-size")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)

    from aotllm.compiler.export import example_inputs, export_bucket
    from aotllm.graphs.buckets import Bucket
    from aotllm.graphs.kv_cache import KVCacheSpec
    from aotllm.models import float_kernels
    from aotllm.models.loader import load_model

    model = load_model(args.checkpoint, args.dtype)
    c = model.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, args.block_size,
                       str(model.dtype).removeprefix("torch."))
    bucket = Bucket("decode", args.batch, 1, args.context // args.block_size)
    with float_kernels.inductor_capture():  # the kernels the Inductor backend picks
        program = export_bucket(model, bucket, spec, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(Path(tmp) / "profile.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False,
                              "cpp.enable_kernel_profile": True},
        )
        graph = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    constants = {**dict(model.named_parameters(remove_duplicate=False)),
                 **dict(model.named_buffers())}
    graph.load_constants({n: constants[n] for n in graph.get_constant_fqns()}, False, True, True)
    *inputs, _ = example_inputs(bucket, spec, model.dtype, torch.device("cpu"))
    kv = [torch.zeros(spec.layer_shape(args.batch * bucket.context_blocks + 1), dtype=model.dtype)
          for _ in range(c.num_layers)]
    flat = [*inputs, *kv]
    for _ in range(5):
        graph.run(flat)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            graph.run(flat)
    print(f"{bucket.name}: {args.steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
    total_ms = prof.key_averages().self_cpu_time_total / 1e3 / args.steps
    print(f"{total_ms:.2f} ms per step inside the graph")


if __name__ == "__main__":
    main()
