"""CompileConfig: everything that decides what `aotllm compile` produces."""

from __future__ import annotations

from dataclasses import dataclass

from aotllm.graphs.devices import device_type
from aotllm.quantize.config import QuantConfig


@dataclass(frozen=True)
class CompileConfig:
    model: str  # local Hugging Face checkpoint directory or GGUF file
    output: str  # artifact directory
    dtype: str = "auto"
    backend: str = "inductor"
    device: str = "cpu"
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 8
    block_size: int = 16
    prefill_buckets: tuple[int, ...] | None = None  # tokens
    decode_batch_sizes: tuple[int, ...] | None = None  # sequences
    context_buckets: tuple[int, ...] | None = None  # tokens, multiples of block_size
    prefill_batch_sizes: tuple[int, ...] | None = None  # prompts per prefill call
    # Reuse graphs of an existing artifact in `output` whose inputs did not change.
    reuse: bool = True
    # Offline quantization (quantize/): None keeps every weight in `dtype`.
    quantization: QuantConfig | None = None
    # vLLM's name. Backends whose graphs need static shapes (ge, and onnx for
    # ATC) are built for exactly this many KV blocks, which the serving host
    # must then allocate; Inductor graphs keep the block count dynamic and
    # ignore it.
    num_gpu_blocks_override: int | None = None
    # GE only: one graph per decode context bucket whose batch dimension is
    # geared (torchair.inference.set_dim_gears) over the plan's decode batch
    # sizes, instead of one graph per decode batch size.
    ge_dim_gears: bool = False
    # Inductor only: one graph per shape group (compiler/shape_groups.py)
    # with the batch, token and context dimensions dynamic over the group's
    # buckets, instead of one graph per bucket. None: on for Inductor (the
    # same decode and prefill speed as per-bucket graphs, measured, at a
    # fraction of the compile time), off for the static-shape backends.
    dynamic_shapes: bool | None = None
    # Graphs compiled side by side in forked worker processes (Inductor;
    # compiler/parallel.py). 1: one after the other, in this process.
    compile_workers: int = 1
    # One weights file per rank, one graph set for all of them (the graphs
    # hold the all-reduces; models/parallel.py says what each rank holds).
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be positive, got "
                             f"{self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.backend == "onnx":
            # The graphs hold the collectives; ONNX has no collective op that
            # onnxruntime or ATC runs.
            raise ValueError("--tensor-parallel-size needs collectives inside the graphs, which "
                             "ONNX cannot hold: compile with --backend inductor (CPU, CUDA) or "
                             "--backend ge (Ascend, HCCL)")
        if self.compile_workers <= 0:
            raise ValueError(f"compile_workers must be positive, got {self.compile_workers}")
        if device_type(self.device) == "cuda" and (self.compile_workers > 1
                                                   or self.tensor_parallel_size > 1):
            # Workers are forked after the model is loaded onto the target
            # device (and TP always traces in workers), and a forked child
            # cannot use CUDA once its parent has.
            what = ("--tensor-parallel-size" if self.tensor_parallel_size > 1
                    else "--compile-workers")
            raise ValueError(f"{what} compiles in forked worker processes, which cannot use "
                             "CUDA once the model is on the GPU: compile CUDA artifacts "
                             "with one worker and one rank (Inductor already compiles a "
                             "graph's GPU kernels in parallel)")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override must be at least 2 (block 0 is the "
                             f"null block), got {self.num_gpu_blocks_override}")
        if self.ge_dim_gears and self.backend != "ge":
            raise ValueError(f"dimension gears (--ge-dim-gears) are a torchair GE feature; "
                             f"the {self.backend} backend compiles one graph per bucket. "
                             "Drop the option or use --backend ge")
        if self.dynamic_shapes is None:
            object.__setattr__(self, "dynamic_shapes", self.backend == "inductor")
        if self.dynamic_shapes and self.backend != "inductor":
            raise ValueError(f"--dynamic-shapes groups buckets into dynamic-shape AOTInductor "
                             f"graphs; the {self.backend} backend needs static shapes. Drop the "
                             "option or use --backend inductor")
