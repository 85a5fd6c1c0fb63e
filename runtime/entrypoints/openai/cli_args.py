"""The server's flags, under vLLM's names, for `aotllm serve` and the module entry point."""

from __future__ import annotations

import argparse
import os

DTYPES = ("auto", "float32", "float16", "bfloat16", "float", "half")
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


def positive_int(text: str) -> int:
    """argparse type for a positive integer (the `aotllm` CLI uses it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def add_server_args(parser: argparse.ArgumentParser, model_positional: bool) -> None:
    if model_positional:
        parser.add_argument("model", metavar="MODEL",
                            help="artifact directory, checkpoint directory or .gguf file")
    else:
        parser.add_argument("--model", required=True, metavar="MODEL",
                            help="artifact directory, checkpoint directory or .gguf file")
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: loopback only; "
                        "0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use (default: MODEL as given)")
    s.add_argument("--api-key", default=os.environ.get("AOTLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1, /tokenize and "
                        "/detokenize (default: $AOTLLM_API_KEY)")
    s.add_argument("--max-waiting-requests", type=positive_int, default=None, metavar="N",
                   help="answer 503 once N requests are waiting to be scheduled "
                        "(default: no limit)")
    s.add_argument("--max-request-body-bytes", type=positive_int,
                   default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help="answer 413 to larger request bodies (default 8 MiB)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds to let running requests finish before they "
                        "are aborted (default 30)")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="do not log each request")
    s.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="report usage.prompt_tokens_details.cached_tokens (prompt tokens "
                        "served from the prefix cache)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    e = parser.add_argument_group("engine")
    e.add_argument("--dtype", choices=DTYPES, default="auto")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or npu")
    e.add_argument("--enforce-eager", action="store_true",
                   help="run the checkpoint eagerly instead of compiling it")
    e.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=None,
                   metavar="N",
                   help="split the model across N ranks, one process each (default: the "
                        "artifact's size, 1 for a checkpoint)")
    e.add_argument("--max-model-len", type=positive_int, default=None, metavar="N")
    e.add_argument("--max-num-seqs", type=positive_int, default=None, metavar="N")
    e.add_argument("--max-num-batched-tokens", type=positive_int, default=None, metavar="N")
    e.add_argument("--gpu-memory-utilization", type=_fraction, default=None, metavar="F")
    e.add_argument("--num-gpu-blocks-override", type=positive_int, default=None, metavar="N")
    e.add_argument("--block-size", type=positive_int, default=None, metavar="N")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="share the KV blocks of repeated prompt prefixes across requests "
                        "(default: on, as in vLLM v1)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--generation-config", default=None, metavar="auto|vllm|DIR",
                   help="default sampling parameters of requests: 'auto' (default) takes the "
                        "model's generation_config.json, 'vllm' ignores it, DIR reads DIR's")
    e.add_argument("--tokenizer", default=None, metavar="DIR")
    e.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                   help="for a checkpoint: w8a16, w8a8 or w8a8_static")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """`EngineArgs` keywords from the flags; unset ones keep EngineArgs' defaults."""
    kwargs: dict = {"dtype": args.dtype, "device": args.device,
                    "enforce_eager": args.enforce_eager}
    for name in ("tensor_parallel_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                 "gpu_memory_utilization", "num_gpu_blocks_override", "block_size", "seed",
                 "tokenizer", "quantization", "enable_prefix_caching", "generation_config"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def make_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m aotllm.entrypoints.openai.api_server",
        description="OpenAI-compatible HTTP server (vLLM's flags).")
    add_server_args(parser, model_positional=False)
    return parser
