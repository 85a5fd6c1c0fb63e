"""Run as a script by tests/test_tensor_parallel.py: LLM with tensor-parallel
ranks in a fresh interpreter, as a user's program runs it; prints JSON.

    python tests/tp_llm_script.py generate MODEL [KWARGS_JSON]
    python tests/tp_llm_script.py kill MODEL [KWARGS_JSON]
    python tests/tp_llm_script.py idle MODEL [KWARGS_JSON]   # idle past the group timeout
    torchrun --nproc-per-node 2 tests/tp_llm_script.py generate MODEL [KWARGS_JSON]
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    import torch

    from aotllm.llm import LLM
    from aotllm.runtime.sampling_params import SamplingParams
    from tests.tp_harness import PROMPTS

    mode, model = sys.argv[1], sys.argv[2]
    kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    max_tokens = kwargs.pop("max_tokens", 10)
    # The process's default thread count: with ranks, rank 0 lowers it to its
    # share of the cores itself (runtime/tp_workers.py says why).
    threads_before = torch.get_num_threads()
    llm = LLM(model, max_num_batched_tokens=16, max_num_seqs=4, num_gpu_blocks_override=64,
              **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def greedy() -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    executor = llm.llm_engine.engine_core.runner.executor
    group = getattr(executor, "group", None)
    result: dict = {"tokens": greedy(), "workers": len(group.procs) if group else 0,
                    "threads": [threads_before, torch.get_num_threads()]}
    if mode == "kill":
        group.procs[0].kill()
        group.procs[0].join()
        t0 = time.perf_counter()
        try:
            greedy()
            result["error"] = None
        except RuntimeError as e:
            result["error"] = str(e)
        result["seconds"] = time.perf_counter() - t0
    elif mode == "idle":
        # Longer than the group timeout: an idle engine's workers must still be there.
        time.sleep(float(os.environ["AOTLLM_TP_TIMEOUT_S"]) + 1)
        result["again"] = greedy()
        group.close()
    elif group is not None:
        group.close()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
