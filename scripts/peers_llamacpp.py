"""llama.cpp as a peer for scripts/bench.py: same workload, figures side by side.

llama.cpp is driven through ``llama-cpp-python``'s low-level C bindings, not
its ``Llama`` class: the high-level class decodes one sequence at a time,
while aotllm batches B sequences into every step. Here a batch of B rows is
one ``llama_batch`` per step (B sequence ids, one KV stream each), which is
what llama.cpp's own ``llama-batched-bench`` and server do.

Workload, matching bench.py: B prompts of given token ids (random, so no
prefix is shared), one prefill of all of them, then ``new_tokens - 1`` greedy
decode steps of the whole batch, never stopping at EOS. ``ttft_s`` is the
prefill of the whole batch until every row has its first token;
``decode_tok_s`` is B * (new_tokens - 1) / decode seconds.

The GGUF files come from llama.cpp's own HF converter (``convert_hf_to_gguf.py``),
taken from the sdist of the installed llama-cpp-python so that the converter
and the runtime are the same llama.cpp revision.

    python scripts/peers_llamacpp.py MODEL.gguf [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 32]
    python scripts/peers_llamacpp.py HF_DIR --outtype q8_0 [--pre-tokenizer qwen2] [--cache DIR]
"""

# No `from __future__ import annotations`: bench.py loads scripts with
# spec_from_file_location without registering them in sys.modules, and
# dataclasses then fail to resolve string annotations.
import argparse
import contextlib
import ctypes
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTTYPES = ("bf16", "f32", "q8_0")

# What convert_hf_to_gguf.py needs from the llama.cpp tree, relative to
# vendor/llama.cpp in the sdist: the script, the `conversion` package it
# imports, the `gguf` package (gguf-py of the same revision: the converter
# uses tensor names, keys and writer methods that an older PyPI gguf may not
# have), and the chat templates a few model classes read at run time.
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/")
_CONVERTER_DONE = ".complete"  # written last: a half-extracted cache is never reused


def llama_cpp_available() -> bool:
    """True when llama_cpp imports (the package is there and its shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or OSError/RuntimeError from loading libllama
        return False
    return True


def _llama_cpp_version() -> str:
    # The distribution's version is the one pip can download again; the
    # module attribute is the fallback for a source tree on sys.path.
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        import llama_cpp

        return llama_cpp.__version__


# --------------------------------------------------------------------------
# HF -> GGUF conversion
# --------------------------------------------------------------------------


def converter_script(cache_dir: Path) -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py matching the installed llama_cpp.

    The first call downloads the sdist of that exact version (about 77 MB;
    only it carries vendor/llama.cpp) and keeps the converter's files in
    ``cache_dir/llama.cpp-convert-VERSION``; later calls reuse them.
    """
    version = _llama_cpp_version()
    dest = Path(cache_dir) / f"llama.cpp-convert-{version}"
    script = dest / "convert_hf_to_gguf.py"
    if (dest / _CONVERTER_DONE).is_file() and script.is_file():
        return script

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-tmp-") as tmp:
        tmp_path = Path(tmp)
        dl = tmp_path / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(dl)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(dl.glob("*.tar.gz")) if dl.is_dir() else []
        if proc.returncode != 0 or not archives:
            raise RuntimeError(f"could not download the llama-cpp-python {version} sdist "
                               f"({' '.join(cmd)}):\n{_tail(proc.stderr or proc.stdout)}")
        staged = tmp_path / "convert"
        n = _extract_converter(archives[0], staged)
        if not (staged / "convert_hf_to_gguf.py").is_file() or n < 3:
            raise RuntimeError(f"{archives[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        (staged / _CONVERTER_DONE).write_text(version + "\n")
        # A rename on the same file system, so a reader sees all or nothing.
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staged, dest)
    return script


def _extract_converter(archive: Path, out: Path) -> int:
    """Copy the converter's files out of the sdist; returns how many were written."""
    written = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            # "<top>/vendor/llama.cpp/<rel>": the top folder's name varies
            # (llama_cpp_python-X vs llama-cpp-python-X), so match after it.
            parts = member.name.split("/", 1)
            if len(parts) != 2 or not parts[1].startswith("vendor/llama.cpp/"):
                continue
            rel = parts[1][len("vendor/llama.cpp/"):]
            if ".." in rel.split("/") or "__pycache__" in rel:
                continue
            if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in _CONVERTER_PARTS):
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, "wb") as f:
                shutil.copyfileobj(src, f)
            written += 1
    return written


# Runs convert_hf_to_gguf.py in-process (argv: SCRIPT PRE_TOKENIZER|"" SCRIPT_ARGS...)
# after two adjustments that only ever turn a converter failure into a
# conversion, never change a conversion that would have worked:
#
# 1. Pre-tokenizer. For a byte-level BPE tokenizer.json the converter encodes
#    a fixed text, hashes the token ids and maps the hash to a llama.cpp
#    pre-tokenizer name (tokenizer.ggml.pre); an unknown hash is a hard
#    NotImplementedError, with no flag to override it. A checkpoint with its
#    own small vocabulary (aotllm's build_tiny_model) always has an unknown
#    hash, because the hash is over ids, even though its split regex is a
#    known one. So when the caller names the pre-tokenizer, an unknown hash
#    falls back to that name; a recognised hash still wins.
# 2. sentencepiece. The Llama converter tries SentencePiece first and takes
#    its FileNotFoundError (no tokenizer.model) as the cue to read
#    tokenizer.json instead, but it imports sentencepiece before looking for
#    the file, so without that package even a pure tokenizer.json checkpoint
#    fails. The file check is moved ahead of the import. (A stand-in module
#    does not work: transformers probes sentencepiece's import spec.)
_DRIVER = r"""
import os, runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
sys.path.insert(0, os.path.dirname(script))
from conversion.base import TextModel

_spm_vocab = TextModel._create_vocab_sentencepiece
def _create_vocab_sentencepiece(self):
    path = self.dir_model / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"File not found: {path}")
    return _spm_vocab(self)
TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece

if pre:
    _hash_lookup = TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return _hash_lookup(self, tokenizer)
        except NotImplementedError:
            print(f"peers_llamacpp: pre-tokenizer hash not recognised; using {pre!r} as asked",
                  file=sys.stderr)
            return pre
    TextModel.get_vocab_base_pre = get_vocab_base_pre

runpy.run_path(script, run_name="__main__")
"""


def convert_to_gguf(hf_dir: Path, outtype: str, out: Path, cache_dir: Path,
                    pre_tokenizer: str | None = None, timeout_s: float = 3600) -> Path:
    """Convert an HF checkpoint dir to ``out`` with llama.cpp's converter; reuse ``out`` if it exists.

    ``pre_tokenizer`` (e.g. "qwen2", "llama-bpe", "gpt-2") is written as
    tokenizer.ggml.pre only when the converter does not recognise the
    tokenizer's hash. aotllm's build_tiny_model tokenizers use the Qwen2
    split regex then ByteLevel, so "qwen2" is the right name for them.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {OUTTYPES}")
    hf_dir, out = Path(hf_dir), Path(out)
    if out.is_file():
        return out
    script = converter_script(Path(cache_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name, renamed on success: an interrupted run
    # must not leave a truncated file that the "skip if exists" would reuse.
    partial = out.with_name(out.name + ".partial")
    env = dict(os.environ)
    gguf_py = str(script.parent / "gguf-py")
    env["PYTHONPATH"] = gguf_py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, "-c", _DRIVER, str(script), pre_tokenizer or "",
           str(hf_dir), "--outtype", outtype, "--outfile", str(partial)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py {hf_dir} ({outtype}) ran past {timeout_s} s") from e
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {hf_dir} (--outtype {outtype}, "
                           f"exit {proc.returncode}):\n{_tail(proc.stderr or proc.stdout)}")
    os.replace(partial, out)
    return out


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------


@dataclass
class PeerResult:
    name: str
    batch: int
    ttft_s: float  # prefill of the whole batch until every row has its first token
    decode_tok_s: float  # tokens generated after the first ones, whole batch, per second
    tokens: list[list[int]] | None = field(default=None, repr=False, compare=False)  # [B][new_tokens]


# ctypes keeps only a pointer to the callback: it must stay referenced for as
# long as llama.cpp may call it, so it lives at module level.
_NO_LOG = None


@contextlib.contextmanager
def _quiet_llama_logs() -> Iterator[None]:
    """Drop llama.cpp/ggml logging (model loading prints hundreds of lines), then restore."""
    global _NO_LOG
    import llama_cpp

    if _NO_LOG is None:
        _NO_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_NO_LOG, ctypes.c_void_p(0))
    try:
        yield
    finally:
        # llama_cpp installs its own Python-side logger at import; put it back
        # so the high-level Llama class keeps its verbose switch.
        previous = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
        llama_cpp.llama_log_set(previous, ctypes.c_void_p(0))


def bench_llamacpp(gguf: Path, prompts: list[list[int]], new_tokens: int, threads: int = 2,
                   name: str = "", extra_bufts: bool = False) -> PeerResult:
    """Greedy batched generation of ``new_tokens`` per prompt with llama.cpp; one warm-up, one timed run.

    ``extra_bufts`` lets llama.cpp move weights into its CPU "extra" buffer
    types: the AMX tile layout on AMX-capable Xeons, and interleaved
    "repacked" layouts for some quant types (on x86 e.g. q4_0, q4_K, iq4_nl;
    never bf16, f32, q8_0 or q4_1). Off by default because on this
    machine (an AMX-capable Xeon VM) llama.cpp's AMX matmul segfaults on the
    first multi-token batch, even with one thread, and the crash takes the
    whole process with it (llama.cpp issue #20824, still open; PR #26954
    traces it to AMX tile permission not requested per thread). With it off
    the figures are llama.cpp's plain AVX-512 kernels, which for bf16, f32,
    q8_0 and q4_1 weights is all it loses; pass True where AMX works.

    ``PeerResult.tokens`` holds the timed run's greedy ids, for parity
    checks (an f32 GGUF reproduces transformers' greedy output exactly).
    """
    import llama_cpp as ll

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one non-empty prompt")
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (decode speed is measured after the first token)")
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(gguf)
    b = len(prompts)
    lengths = [len(p) for p in prompts]
    n_prompt = sum(lengths)

    model = ctx = None
    batch = None
    with _quiet_llama_logs():
        ll.llama_backend_init()
        try:
            mparams = ll.llama_model_default_params()
            mparams.n_gpu_layers = 0  # a CPU peer, like aotllm's CPU bench
            mparams.use_extra_bufts = extra_bufts
            model = ll.llama_model_load_from_file(str(gguf).encode(), mparams)
            if not model:
                raise RuntimeError(f"llama.cpp could not load {gguf}")
            n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
            bad = [t for p in prompts for t in p if not 0 <= t < n_vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} outside the model's vocab ({n_vocab})")

            cparams = ll.llama_context_default_params()
            # KV is split evenly between sequences (kv_unified stays off:
            # random prompts share no prefix), so n_ctx is per-row need x rows.
            cparams.n_ctx = b * (max(lengths) + new_tokens)
            cparams.n_batch = n_prompt  # the whole prefill is one llama_decode call
            cparams.n_seq_max = b
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
            # n_ubatch, flash attention, KV type (f16): llama.cpp's defaults.
            ctx = ll.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {gguf} (batch {b})")
            batch = ll.llama_batch_init(n_prompt, 0, 1)

            _generate(ll, ctx, batch, prompts, 4, n_vocab)  # warm-up: allocations, graph build, caches
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            ttft, decode_s, tokens = _generate(ll, ctx, batch, prompts, new_tokens, n_vocab)
        finally:
            if batch is not None:
                ll.llama_batch_free(batch)
            if ctx:
                ll.llama_free(ctx)
            if model:
                ll.llama_model_free(model)
    return PeerResult(name or f"llama.cpp {gguf.name}", b, ttft, b * (new_tokens - 1) / decode_s,
                      tokens.tolist())


def _generate(ll, ctx, batch, prompts: list[list[int]], new_tokens: int,
              n_vocab: int) -> tuple[float, float, np.ndarray]:
    """One batched greedy run on an empty KV: (ttft seconds, decode seconds, tokens [B, new_tokens])."""
    b = len(prompts)
    n_prompt = sum(len(p) for p in prompts)
    # numpy views on the batch's C arrays: filling them is then no Python
    # loop per token in the timed decode steps.
    token = np.ctypeslib.as_array(batch.token, shape=(n_prompt,))
    pos = np.ctypeslib.as_array(batch.pos, shape=(n_prompt,))
    n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_prompt,))
    want_logits = np.ctypeslib.as_array(batch.logits, shape=(n_prompt,))

    def argmax_of(i: int) -> int:
        ptr = ll.llama_get_logits_ith(ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no logits for batch index {i}")
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def decode(n_tokens: int, what: str) -> None:
        batch.n_tokens = n_tokens
        rc = ll.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed in {what} (code {rc})")

    # Prefill: every prompt token of every row, row r as sequence r; logits
    # only where a row's first new token is read off.
    last_index: list[int] = []
    i = 0
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        token[i:i + n] = prompt
        pos[i:i + n] = np.arange(n)
        n_seq_id[i:i + n] = 1
        for k in range(i, i + n):
            batch.seq_id[k][0] = row
        want_logits[i:i + n] = 0
        want_logits[i + n - 1] = 1
        i += n
        last_index.append(i - 1)

    t0 = time.perf_counter()
    decode(n_prompt, "prefill")
    last = [argmax_of(k) for k in last_index]
    t1 = time.perf_counter()
    out = np.empty((b, new_tokens), dtype=np.int64)
    out[:, 0] = last

    # Decode: row r is batch slot r in every step; only its token and
    # position change, so the rest is set once, outside the step loop.
    for row in range(b):
        batch.seq_id[row][0] = row
    n_seq_id[:b] = 1
    want_logits[:b] = 1
    next_pos = np.array([len(p) for p in prompts], dtype=pos.dtype)
    for step in range(1, new_tokens):  # fixed length: EOS is never checked (ignore_eos)
        token[:b] = last
        pos[:b] = next_pos
        decode(b, "decode")
        last = [argmax_of(row) for row in range(b)]
        out[:, step] = last
        next_pos += 1
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


# --------------------------------------------------------------------------
# CLI: quick checks by hand
# --------------------------------------------------------------------------


def _random_prompts(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, vocab, size=(batch, prompt_len)).tolist()


def _gguf_vocab(path: Path) -> int:
    import llama_cpp as ll

    with _quiet_llama_logs():
        params = ll.llama_model_default_params()
        params.vocab_only = True
        model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        try:
            return ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
        finally:
            ll.llama_model_free(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a .gguf file, or an HF checkpoint dir to convert first")
    ap.add_argument("--outtype", default="bf16", choices=OUTTYPES)
    ap.add_argument("--pre-tokenizer", default=None, help="tokenizer.ggml.pre if the hash is unknown")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "aotllm-bench")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-bufts", action="store_true", help="allow AMX / repacked weights (see bench_llamacpp)")
    args = ap.parse_args()

    if not llama_cpp_available():
        sys.exit("llama_cpp is not importable (pip install llama-cpp-python)")
    path = args.model
    if path.is_dir():
        out = args.cache / f"{path.resolve().name}-{args.outtype}.gguf"
        t = time.perf_counter()
        path = convert_to_gguf(path, args.outtype, out, args.cache, pre_tokenizer=args.pre_tokenizer)
        print(f"converted -> {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)")
    vocab = _gguf_vocab(path)
    for b in (int(x) for x in args.batch_sizes.split(",")):
        r = bench_llamacpp(path, _random_prompts(vocab, b, args.prompt_len), args.new_tokens,
                           threads=args.threads, extra_bufts=args.extra_bufts)
        print(r, flush=True)


if __name__ == "__main__":
    main()
