"""The `aotllm` console script: `aotllm compile`, `generate`, `eval-ppl`, `serve`,
`verify`.

Flag names follow vLLM's (`--max-model-len`, `--max-num-seqs`, ...). torch,
the compiler and the runtime are imported inside the subcommands, so
`aotllm --help` answers at once.

Errors a user can fix (bad flag values, a missing model directory, an
artifact that does not fit) end as one `error: ...` line on stderr and exit
code 2; `--debug` or AOTLLM_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from aotllm.graphs.devices import DEVICE_TYPES, device_type
# argparse only, no server imports: cheap for `aotllm --help`.
from aotllm.runtime.entrypoints.openai.cli_args import add_server_args, positive_int
from aotllm.logger import LOG_DATEFMT, LOG_FORMAT

logger = logging.getLogger("aotllm.cli")

EXIT_USAGE = 2
# `aotllm verify` found a missing or damaged file (distinct from a usage error).
EXIT_VERIFY_FAILED = 1
DTYPES = ("auto", "float32", "float16", "bfloat16")


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for `16,64,256`: comma-separated positive integers."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 16,64,256, got {text!r}"
        ) from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every entry must be a positive integer, got {text!r}")
    return values


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's unset flag must not overwrite `aotllm --debug ...`.
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks (also: AOTLLM_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aotllm",
        description="Ahead-of-time compiled LLM inference with a vLLM-compatible API.",
    )
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a checkpoint into an artifact",
                       description="Compile a local Hugging Face checkpoint directory or a "
                                   "llama.cpp .gguf file into an artifact directory of "
                                   "shape-bucketed static graphs.")
    c.add_argument("model", metavar="MODEL",
                   help="local Hugging Face checkpoint directory or .gguf file")
    c.add_argument("--output", "-o", required=True, metavar="DIR", help="artifact directory")
    c.add_argument("--dtype", choices=DTYPES, default="auto")
    c.add_argument("--device", choices=("auto", *DEVICE_TYPES), default="auto",
                   help="device the graphs are compiled for (auto: npu, else cuda, else cpu)")
    c.add_argument("--backend", default="inductor",
                   help="inductor (AOTInductor, cpu/cuda), ge (torchair GE graphs for Ascend "
                        "NPUs) or onnx (onnxruntime, and Ascend's ATC)")
    c.add_argument("--num-gpu-blocks-override", type=positive_int, default=None, metavar="N",
                   help="build static-shape graphs (ge, onnx for ATC) for exactly N KV blocks")
    c.add_argument("--ge-dim-gears", action="store_true",
                   help="ge only: one decode graph per context bucket with its batch dimension "
                        "geared over the decode batch sizes (torchair set_dim_gears)")
    c.add_argument("--dynamic-shapes", action=argparse.BooleanOptionalAction, default=None,
                   help="inductor: one graph per shape group (decode batch 1, decode batch "
                        ">= 2, prefill per batch size) with dynamic batch, token and context "
                        "dimensions (default); --no-dynamic-shapes: one graph per bucket")
    c.add_argument("--compile-workers", type=positive_int, default=None, metavar="N",
                   help="inductor: compile N graphs at once in forked worker processes "
                        "(default: the CPU count, at most 4; CPU only, 1 for cuda)")
    c.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="inductor or ge: split the model across N ranks (one weights file "
                        "each, one graph set with the collectives inside; served by N "
                        "processes)")
    c.add_argument("--max-model-len", type=positive_int, default=None, metavar="N",
                   help="default: the checkpoint's max_position_embeddings")
    c.add_argument("--max-num-seqs", type=positive_int, default=8, metavar="N",
                   help="largest decode batch (default 8)")
    c.add_argument("--block-size", type=positive_int, default=16, metavar="N")
    c.add_argument("--prefill-buckets", type=int_list, metavar="N,N,...",
                   help="prefill chunk lengths in tokens, e.g. 16,64,256")
    c.add_argument("--decode-batch-sizes", type=int_list, metavar="N,N,...",
                   help="decode batch sizes, e.g. 1,2,4,8 (the largest must be --max-num-seqs)")
    c.add_argument("--context-buckets", type=int_list, metavar="N,N,...",
                   help="context lengths in tokens (multiples of --block-size); decode uses "
                        "each, prefill the full one and the narrowest that holds the chunk")
    c.add_argument("--prefill-batch-sizes", type=int_list, metavar="N,N,...",
                   help="prompts prefilled in one graph call, e.g. 1,4 (must include 1; "
                        "default 1 and min(4, --max-num-seqs))")
    c.add_argument("--no-reuse", action="store_true",
                   help="recompile every graph even if OUTPUT has a matching one")
    q = c.add_argument_group("quantization")
    q.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                   help="w8a16 (int8 weights), w8a8 (int8 weights and per-token int8 "
                        "activations, SmoothQuant) or w8a8_static; default: none")
    q.add_argument("--group-size", type=positive_int, default=None, metavar="N",
                   help="w8a16: input channels per weight scale (default: one per channel)")
    q.add_argument("--smoothquant-alpha", type=float, default=0.5, metavar="A",
                   help="w8a8: migration strength in [0, 1] (default 0.5)")
    q.add_argument("--calibration-data", default=None, metavar="FILE",
                   help="w8a8: text file for activation statistics (default: built-in set)")
    q.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too (kept in --dtype by default)")
    q.add_argument("--exclude-modules", type=lambda s: tuple(s.split(",")), default=(),
                   metavar="PAT,PAT", help="linears to keep in --dtype (fnmatch patterns "
                                           "of module names, e.g. 'model.layers.0.*')")
    _add_debug(c)
    c.set_defaults(func=cmd_compile)

    g = sub.add_parser("generate", help="generate completions for prompts",
                       description="Generate with an artifact directory, a Hugging Face "
                                   "checkpoint directory or a .gguf file (compiled into the "
                                   "cache unless --enforce-eager).")
    g.add_argument("model", metavar="MODEL",
                   help="artifact directory, checkpoint directory or .gguf file")
    g.add_argument("--prompt", "-p", action="append", required=True, metavar="TEXT",
                   help="a prompt; repeat for a batch")
    g.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    _add_engine_options(g)
    _add_debug(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval-ppl", help="perplexity of a text file",
                       description="Perplexity of a text file through the same runtime and "
                                   "compiled buckets that generate uses (teacher forcing, one "
                                   "token per decode step, several windows per batch).")
    e.add_argument("model", metavar="MODEL", help="artifact or checkpoint directory")
    e.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to score")
    e.add_argument("--window", type=positive_int, default=None, metavar="N",
                   help="most tokens per window (default: max_model_len, at most 1024)")
    e.add_argument("--json", action="store_true", help="also print the numbers as one JSON line")
    _add_engine_options(e)
    _add_debug(e)
    e.set_defaults(func=cmd_eval_ppl)

    v = sub.add_parser("verify", help="check every file of an artifact against its sha256",
                       description="Hash every file of an artifact directory in full and "
                                   "compare with its manifest. Loading checks only sizes and "
                                   "sampled digests; this finds any damaged byte. Exits 1 "
                                   "naming the corrupted files.")
    v.add_argument("artifact", metavar="ARTIFACT", help="artifact directory")
    _add_debug(v)
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="OpenAI-compatible server (/v1/completions, "
                                   "/v1/chat/completions, ...) with vLLM's flags. A checkpoint "
                                   "is compiled into the cache first unless --enforce-eager.")
    add_server_args(s, model_positional=True)
    _add_debug(s)
    s.set_defaults(func=cmd_serve)
    return parser


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The `LLM(...)` options every subcommand that loads a model takes;
    `_llm_kwargs` passes them on."""
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run the torch model eagerly")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--device", choices=("auto", *DEVICE_TYPES), default="auto")
    parser.add_argument("--max-model-len", type=positive_int, default=None, metavar="N")
    parser.add_argument("--max-num-seqs", type=positive_int, default=None, metavar="N")
    parser.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=None,
                        metavar="N", help="ranks, one process each (default: the artifact's "
                                          "size, 1 for a checkpoint)")
    parser.add_argument("--quantization", "-q", default=None, metavar="SCHEME",
                        help="for a checkpoint: w8a16, w8a8 or w8a8_static (see `compile`)")


def _llm_kwargs(args: argparse.Namespace) -> dict:
    """`LLM(...)` keyword arguments from the parsed flags; unset optional ones are
    left out so `LLM`'s own defaults apply."""
    kwargs: dict = {"dtype": args.dtype, "device": args.device,
                    "enforce_eager": args.enforce_eager}
    for name in ("seed", "max_model_len", "max_num_seqs", "quantization",
                 "tensor_parallel_size"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def cmd_compile(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if model.is_file():
        from aotllm.models.checkpoint import open_checkpoint

        open_checkpoint(model)  # refuses, with a message, a file that is not GGUF
    elif not (model / "config.json").is_file():
        raise FileNotFoundError(
            f"{model} is not a Hugging Face checkpoint directory (no config.json) or a "
            ".gguf file; pass a local checkpoint directory or GGUF file"
        )
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact
    from aotllm.quantize.config import QuantConfig, resolve_scheme
    from aotllm.runtime.devices import resolve_device

    # An explicit device is the backend's to check (GE compiles for an NPU it
    # needs torch_npu for; Inductor for cuda needs a CUDA torch).
    device = args.device
    if device == "auto":
        # GE graphs exist only for NPUs, ONNX graphs are exported on (and run
        # by onnxruntime on) the CPU: those backends imply their device.
        implied = {"ge": "npu", "onnx": "cpu"}.get(args.backend)
        device = implied or resolve_device("auto").type
    cfg = CompileConfig(
        model=str(model), output=args.output, dtype=args.dtype, backend=args.backend,
        device=device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        block_size=args.block_size, prefill_buckets=args.prefill_buckets,
        decode_batch_sizes=args.decode_batch_sizes, context_buckets=args.context_buckets,
        prefill_batch_sizes=args.prefill_batch_sizes, reuse=not args.no_reuse,
        quantization=_quant_config(args, QuantConfig, resolve_scheme),
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        ge_dim_gears=args.ge_dim_gears, dynamic_shapes=args.dynamic_shapes,
        # Forked workers cannot use CUDA (CompileConfig says so when asked).
        compile_workers=args.compile_workers or (1 if device_type(device) == "cuda"
                                                 else min(os.cpu_count() or 1, 4)),
        tensor_parallel_size=args.tensor_parallel_size,
    )
    t0 = time.perf_counter()
    manifest = compile_artifact(cfg)
    print(f"Compiled {len(manifest.graphs)} bucket graphs ({manifest.dtype}, {manifest.backend}, "
          f"{manifest.device}) into {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


def _quant_config(args: argparse.Namespace, QuantConfig, resolve_scheme):
    scheme = resolve_scheme(args.quantization)
    if scheme is None:
        if args.group_size or args.calibration_data or args.quantize_lm_head or args.exclude_modules:
            raise ValueError("quantization options were given without --quantization")
        return None
    return QuantConfig(scheme, group_size=args.group_size, exclude=args.exclude_modules,
                       quantize_lm_head=args.quantize_lm_head,
                       smoothquant_alpha=args.smoothquant_alpha,
                       calibration_data=args.calibration_data)


def cmd_generate(args: argparse.Namespace) -> int:
    from aotllm import LLM, SamplingParams

    # Checked before loading the model, so a bad flag fails at once.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k)
    t0 = time.perf_counter()
    llm = LLM(args.model, **_llm_kwargs(args))
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if args.chat:
        conversations = [[{"role": "user", "content": p}] for p in args.prompt]
        outputs = llm.chat(conversations, params)
    else:
        outputs = llm.generate(args.prompt, params)
    gen_s = time.perf_counter() - t0

    n_tokens = 0
    for out in outputs:
        completion = out.outputs[0]
        n_tokens += len(completion.token_ids)
        print(f"Prompt: {out.prompt!r}")
        print(f"Generated: {completion.text!r}")
        print()
    plural = "" if len(outputs) == 1 else "s"
    print(f"Generated {n_tokens} tokens for {len(outputs)} prompt{plural} in {gen_s:.2f} s "
          f"({n_tokens / max(gen_s, 1e-9):.1f} tokens/s); model loaded in {load_s:.2f} s")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    # Checked before loading the model, so a bad file fails at once.
    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"data file {data} does not exist (or is not a file)")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {data} is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"data file {data} is empty: there is no text to score")

    from aotllm import LLM
    from aotllm.runtime.scoring import evaluate_perplexity

    llm = LLM(args.model, **_llm_kwargs(args))
    t0 = time.perf_counter()
    result = evaluate_perplexity(llm, text, window=args.window)
    seconds = time.perf_counter() - t0
    rate = result.num_tokens / max(seconds, 1e-9)
    print(f"perplexity {result.perplexity:.3f} over {result.num_tokens} tokens "
          f"({result.num_windows} window{'' if result.num_windows == 1 else 's'} of "
          f"<={result.window}) in {seconds:.1f} s "
          f"({rate:.0f} tokens/s)")
    if args.json:
        print(json.dumps({
            "model": args.model, "data": str(data), "perplexity": result.perplexity,
            "nll": result.nll, "num_tokens": result.num_tokens,
            "num_windows": result.num_windows, "window": result.window,
            "seconds": seconds, "tokens_per_s": rate,
        }))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # Stdlib only: verifying needs neither torch nor the backend's runtime.
    from aotllm.graphs.manifest import ArtifactError, Manifest, verify_files

    t0 = time.perf_counter()
    manifest = Manifest.read(args.artifact)  # an unreadable manifest: exit 2, as elsewhere
    try:
        verify_files(manifest, args.artifact)
    except ArtifactError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_VERIFY_FAILED
    files = manifest.files()
    size = sum((Path(args.artifact) / name).stat().st_size for name, _ in files)
    print(f"{args.artifact}: all {len(files)} files match their sha256 "
          f"({size / (1 << 20):.1f} MiB in {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from aotllm.runtime.entrypoints.openai.api_server import run_server
    except ImportError as e:
        raise ValueError(f"the server needs its extra dependencies ({e.name} is missing): "
                         "pip install 'aotllm[serve]'") from None

    return run_server(args)


def setup_logging() -> None:
    """vLLM-style INFO lines on stderr for aotllm's own loggers."""
    root = logging.getLogger("aotllm")
    # Replace (not add) our handler: main() may run many times in one process,
    # and each run should write to the sys.stderr of that moment.
    for h in [h for h in root.handlers if getattr(h, "_aotllm_cli", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    handler._aotllm_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (exit 2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    return run_parsed(args)


def run_parsed(args: argparse.Namespace) -> int:
    """Runs `args.func(args)` with aotllm's logging; user errors become one line."""
    setup_logging()
    debug = getattr(args, "debug", False) or os.environ.get("AOTLLM_DEBUG", "") not in ("", "0")

    from aotllm.graphs.manifest import ArtifactError  # stdlib only: cheap

    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ArtifactError) as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
