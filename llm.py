"""`LLM`: vLLM's blocking offline API (generate, chat) over LLMEngine.

This sits above both halves: given a checkpoint (Hugging Face directory or
GGUF file) without `enforce_eager`, it has the compiler build (or reuse) a
cached artifact, then hands the runtime that artifact. The runtime itself
never imports the compiler.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from aotllm.graphs.manifest import Manifest, is_artifact_dir
from aotllm.logger import configure_logging
from aotllm.models.checkpoint import is_checkpoint
from aotllm.runtime.chat import apply_chat_template
from aotllm.runtime.engine import LLMEngine, PromptType
from aotllm.runtime.engine_args import EngineArgs
from aotllm.runtime.outputs import RequestOutput
from aotllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """An LLM for offline inference, with vLLM's constructor names.

    `model` is a local Hugging Face checkpoint directory, a llama.cpp .gguf
    file, or an aotllm artifact directory. `enforce_eager=True` runs the torch
    model eagerly.
    """

    def __init__(self, model: str, **kwargs: Any):
        configure_logging()
        args = EngineArgs.from_kwargs(str(model), **kwargs)
        self.engine_args = resolve_model(args)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    def get_tokenizer(self):
        """transformers' tokenizer, as vLLM returns (the engine may run a lighter
        one with the same encode/decode, runtime/tokenizer.py)."""
        tokenizer = self.llm_engine.tokenizer
        return getattr(tokenizer, "hf", tokenizer)

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended defaults (its
        generation_config.json, unless generation_config="vllm"): what
        `generate` and `chat` use when given none."""
        return SamplingParams(**self.llm_engine.default_sampling)

    def reset_prefix_cache(self) -> bool:
        """Forgets the cached prefixes no request holds (vLLM's name); True if
        prefix caching is on."""
        return self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompt_list)} prompts; "
                    "pass one SamplingParams, or one per prompt"
                )
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        if not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            text, ids = apply_chat_template(
                self.get_tokenizer(), conv, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(
        self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._counter))
                engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # nothing half-submitted stays queued
            raise
        finals: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        n_in = n_out = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
                    n_in += len(out.prompt_token_ids)
                    n_out += sum(len(o.token_ids) for o in out.outputs)
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(
                        f"est. speed input: {n_in / elapsed:.2f} toks/s, "
                        f"output: {n_out / elapsed:.2f} toks/s"
                    )
                    bar.update(1)
        bar.close()
        return [finals[rid] for rid in ids]


def resolve_model(args: EngineArgs) -> EngineArgs:
    """Points `args.model` at an artifact, compiling a checkpoint unless eager."""
    path = Path(args.model)
    graph_mode = args.torchair_graph_config()
    if graph_mode.enabled and is_artifact_dir(path):
        backend = Manifest.read(path).backend
        if backend != "ge":
            raise ValueError(
                f"torchair_graph_config is enabled but {path} holds {backend} graphs; "
                "compile the checkpoint with --backend ge, or drop additional_config"
            )
    if args.enforce_eager or is_artifact_dir(path) or not is_checkpoint(path):
        return args
    from aotllm.compiler.cache import cached_artifact
    from aotllm.compiler.config import CompileConfig

    from aotllm.quantize.config import QuantConfig

    quant = QuantConfig(args.quantization) if args.quantization else None
    common = dict(model=str(path), output="", dtype=args.dtype, max_model_len=args.max_model_len,
                  block_size=args.block_size, quantization=quant)
    if graph_mode.enabled:
        # vllm-ascend's TorchAir graph mode: GE graphs for the NPU, one per
        # graph batch size, rebuilt on every start unless use_cached_graph.
        sizes = graph_mode.graph_batch_sizes or None
        max_num_seqs = graph_mode.max_num_seqs(args.max_num_seqs)
        cfg = CompileConfig(**common, backend="ge", device="npu", max_num_seqs=max_num_seqs,
                            decode_batch_sizes=sizes, reuse=graph_mode.use_cached_graph,
                            num_gpu_blocks_override=args.num_gpu_blocks_override)
        args = dataclasses.replace(args, max_num_seqs=max_num_seqs)
    else:
        cfg = CompileConfig(**common, device=args.resolve_device().type,
                            max_num_seqs=args.max_num_seqs,
                            tensor_parallel_size=args.tensor_parallel_size)
    artifact = cached_artifact(cfg)
    return dataclasses.replace(args, model=str(artifact), dtype="auto")


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        raise TypeError(
            "a bare list of ints is ambiguous; pass {'prompt_token_ids': [...]} for a token prompt"
        )
    return list(prompts)
