"""Quantization of every family beyond Llama (eager): SmoothQuant folding leaves
each layout's float model unchanged (LayerNorm biases, Falcon's shared norm
before parallel branches, Glm4's sandwich norms, MoE layers whose experts
stay float), and a quantized model's logits stay close to the float model's."""

from __future__ import annotations

import pytest
import torch

from aotllm.models.checkpoint import hf_tokenizer
from aotllm.models.layers import Linear
from aotllm.models.loader import load_model
from aotllm.quantize.apply import quantize_model, smooth, target_linears
from aotllm.quantize.calibrate import collect_input_absmax, read_calibration_text, run_sequence
from aotllm.quantize.config import QuantConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# variant -> (smoothing groups, quantized linears) per layer. Groups: (norm ->
# qkv), (norm -> gate/up), (up rows -> down) where the layout has them;
# linears: qkv, o, and a dense MLP's (or a shared expert's) in and down.
VARIANTS = {
    "qwen3-mqa-bias-tied": (3, 4),
    "glm-gqa-bias": (3, 4),
    "glm4-mqa-tied": (3, 4),  # sandwich: post_attention_layernorm still feeds gate/up alone
    "chatglm-mqa-bias": (3, 4),
    "internlm2-gqa-bias": (3, 4),
    "falcon-mqa": (1, 4),  # one LayerNorm read by qkv and up together; GELU: no up -> down
    "falcon-newarch-bias-tied": (2, 4),  # ln_attn -> qkv, ln_mlp -> up
    "falcon-mha-sequential": (2, 4),
    "mixtral-top2": (1, 2),  # experts are no Linears: only input_layernorm -> qkv
    "qwen2-moe-shared": (2, 4),  # the shared expert's up -> down folds; its linears quantize
    "qwen3-moe-norm-topk": (1, 2),
}
PROMPTS = ("The lighthouse keeper climbed the stairs at dawn to check the lamp.",
           "def add(a, b):\n    return a + b  # 42 apples, 7 pears")


def _model(tiny_models, variant: str):
    """The float model with every 1-D parameter (norm weights and biases,
    linear biases) moved off the checkpoint's 1 / 0, which transformers' init
    leaves there: a fold that forgot a bias would then change the output."""
    model = load_model(tiny_models.get(variant), "float32")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _logits(model, tokenizer) -> torch.Tensor:
    return torch.stack([run_sequence(model, tokenizer.encode(p))[0] for p in PROMPTS])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_smoothquant_folding_leaves_the_float_model_unchanged(tiny_models, variant):
    model = _model(tiny_models, variant)
    tokenizer = hf_tokenizer(tiny_models.get(variant))
    before = _logits(model, tokenizer)
    names = target_linears(model, QuantConfig("w8a8"))
    calib = tokenizer.encode(read_calibration_text(None).text)[:2048]
    stats = collect_input_absmax(model, calib, names)
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n and p.dim() == 1}
    assert smooth(model, stats, 0.5) == VARIANTS[variant][0] * model.config.num_layers
    # The fold moved something (every pre-branch norm, biases included) ...
    changed = {n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])}
    assert "model.layers.0.input_layernorm.weight" in changed
    if model.config.norm == "layer":
        assert "model.layers.0.input_layernorm.bias" in changed
    # ... and the network still computes the same function.
    after = _logits(model, tokenizer)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4), (after - before).abs().max()


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8", "w8a8_static"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_logits_stay_close_to_float(tiny_models, variant, scheme):
    model = _model(tiny_models, variant)
    tokenizer = hf_tokenizer(tiny_models.get(variant))
    ref = _logits(model, tokenizer)
    record = quantize_model(model, QuantConfig(scheme, calibration_tokens=2048), tokenizer)
    c = model.config
    assert record["quantized_linears"] == VARIANTS[variant][1] * c.num_layers
    assert isinstance(model.lm_head, Linear) and "lm_head" in record["float_modules"]
    if c.num_experts:  # what the schemes leave float in a MoE layer, said in the manifest
        for i in range(c.num_layers):
            assert {f"model.layers.{i}.mlp.gate",
                    f"model.layers.{i}.mlp.experts"} <= set(record["float_modules"])
            shared_gate = f"model.layers.{i}.mlp.shared_expert_gate"
            assert (shared_gate in record["float_modules"]) == bool(
                c.shared_expert_intermediate_size)
    got = _logits(model, tokenizer)
    # Relative L2 error of the logits: int8 per-channel weights keep it near 2%
    # on these models, per-tensor static activations near 5%; a wrong shard,
    # scale or fold lands at O(1). MoE layers get twice the room: a token whose
    # top-k changes under quantization switches experts, a discrete jump.
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    bound = (0.12 if scheme == "w8a8_static" else 0.06) * (2 if c.num_experts else 1)
    assert rel < bound, f"{variant} {scheme}: relative logit error {rel:.4f}"
    # Random tiny models have near-ties: the float model's choice stays among the top 3.
    top3 = got.topk(3, dim=-1).indices
    assert (top3 == ref.argmax(-1, keepdim=True)).any(-1).all()


@pytest.mark.slow
def test_compiled_w8a8_falcon_equals_the_eager_quantized_model(artifacts, tiny_models):
    """A quantized family beyond Llama compiles into buckets and serves: Falcon
    (LayerNorm biases folded, parallel branches, GELU MLP, linear biases) as
    w8a8, one layer, against the eager engine quantizing the same checkpoint."""
    from aotllm import LLM, SamplingParams
    from aotllm.graphs.manifest import Manifest
    from tests.test_families import FAMILY_PLAN, ONE_LAYER

    variant = "falcon-newarch-bias-tied"
    path = artifacts.get(variant, "float32", quantization="w8a8", model_kwargs=ONE_LAYER,
                         **FAMILY_PLAN)
    record = Manifest.read(path).quantization
    assert record["quantized_linears"] == 4 and record["smoothquant"]["groups_folded"] == 2
    eager = LLM(str(tiny_models.get(variant, **ONE_LAYER)), dtype="float32", quantization="w8a8",
                enforce_eager=True, block_size=16, max_model_len=64, max_num_seqs=2)
    g = torch.Generator().manual_seed(5)
    vocab = eager.llm_engine.vocab_size
    prompts = [{"prompt_token_ids": torch.randint(5, vocab, (n,), generator=g).tolist()}
               for n in (3, 30, 17)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got, want = ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                 for llm in (LLM(str(path)), eager))
    assert got == want
