"""Build a small random-weight Hugging Face checkpoint for tests, demos and benchmarks.

The directory it writes looks like a hub checkpoint (config.json,
generation_config.json, *.safetensors, tokenizer files), so everything
downstream can load it by path and nothing is ever downloaded.

Tokenizer: byte-level BPE trained on ``scripts/data/corpus.txt`` (deterministic,
well under a second), so any UTF-8 text round-trips. It is built the way
transformers 5 rebuilds a Qwen2 tokenizer on load (the Qwen regex split, then
ByteLevel; plus NFC normalization for the qwen2 family only), so
``AutoTokenizer`` and the raw ``tokenizer.json`` encode identically for every
family. Special tokens, with the ids they always get:

    0 <|begin_of_text|>  bos; added in front of every encoded text (Llama style)
    1 <|end_of_text|>    eos
    2 <|im_start|>       ChatML turn start
    3 <|im_end|>         ChatML turn end
    4 <|pad|>            padding

The chat template is ChatML and starts with the bos token, so
``apply_chat_template(..., tokenize=True)`` yields exactly one bos. When you
render with ``tokenize=False`` and encode yourself, pass
``add_special_tokens=False`` (as vLLM does for chat) or the bos appears twice.

CLI:
    python scripts/build_tiny_model.py OUT_DIR --family llama --preset tiny \
        --dtype bfloat16 [--max-shard-size 200KB] [--set num_key_value_heads=1 ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path
from typing import Any

CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids (0..4): the BPE trainer adds special tokens first.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "glm", "glm4", "falcon", "mixtral",
            "qwen2_moe", "qwen3_moe")
DTYPES = ("float32", "float16", "bfloat16")

# tokenizer_vocab_size is the BPE training target; the corpus caps what is
# reachable (about 5k), so "125m" gets every merge the corpus allows and its
# model keeps a realistic 32000-row embedding regardless.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "tokenizer_vocab_size": 512,
        "config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 512,
            # Wide init spreads the logits so greedy decoding has no near-ties
            # that would make eager-vs-compiled parity flaky.
            "initializer_range": 0.1,
        },
    },
    "125m": {
        "tokenizer_vocab_size": 32000,
        "config": {
            "vocab_size": 32000,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "intermediate_size": 2048,
            "max_position_embeddings": 2048,
            "initializer_range": 0.02,
        },
    },
}

_COMMON_CONFIG: dict[str, Any] = {
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
# Keep the families' attention plain (full causal) unless a caller asks for a
# sliding window explicitly; the defaults would otherwise differ per family.
_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"use_sliding_window": False},
    "mistral": {"sliding_window": None},
    "qwen3": {"use_sliding_window": False},
    "glm": {},
    "glm4": {},
    "falcon": {"alibi": False},
    "mixtral": {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2},
    # Experts narrower than the dense MLP, as in the released models.
    "qwen2_moe": {"use_sliding_window": False, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32, "shared_expert_intermediate_size": 96},
    "qwen3_moe": {"use_sliding_window": False, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32},
}
# Families whose config class spells the common fields differently (None: has no such field).
_FIELD_NAMES: dict[str, dict[str, str | None]] = {
    "falcon": {"num_key_value_heads": "num_kv_heads", "intermediate_size": "ffn_hidden_size",
               "rms_norm_eps": "layer_norm_epsilon", "hidden_act": None},
}
_HEAD_DIM_FAMILIES = ("qwen3", "glm", "glm4", "qwen3_moe")
# Families whose tokenizer transformers 5 rebuilds as Qwen2Tokenizer (NFC normalised).
_NFC_FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Read by every family's modeling code (via getattr) although not every config
# class declares it.
_EXTRA_FIELDS = ("head_dim",)
_DEFAULT_ROPE_THETA = 10000.0


def build_tiny_model(
    out_dir: str | Path,
    family: str = "llama",
    preset: str = "tiny",
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint plus tokenizer to ``out_dir`` and return it.

    ``config_overrides`` replace any config field (``num_key_value_heads=1``,
    ``head_dim=32``, ``tie_word_embeddings=True``, ...). ``rope_scaling`` and
    ``rope_theta`` are accepted in the pre-transformers-5 spelling and mapped
    to ``rope_parameters``. Same arguments and seed give identical weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    config_cls = _config_class(family)

    tokenizer = _make_tokenizer(PRESETS[preset]["tokenizer_vocab_size"], family)
    config = _make_config(config_cls, family, preset, tokenizer, config_overrides)
    tokenizer.model_max_length = config.max_position_embeddings

    # Build in float32 so every dtype is a rounding of the same weights, and
    # fork the RNG so a caller's global torch seed is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(out)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out


def _config_class(family: str) -> type:
    import transformers as tf

    classes = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig,
               "qwen3": tf.Qwen3Config, "glm": tf.GlmConfig, "glm4": tf.Glm4Config,
               "falcon": tf.FalconConfig, "mixtral": tf.MixtralConfig,
               "qwen2_moe": tf.Qwen2MoeConfig, "qwen3_moe": tf.Qwen3MoeConfig}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    return classes[family]


def _make_config(
    config_cls: type,
    family: str,
    preset: str,
    tokenizer: Any,
    overrides: dict[str, Any],
) -> Any:
    overrides = dict(overrides)
    fixed = sorted(set(overrides) & set(_TOKEN_ID_FIELDS))
    if fixed:
        raise ValueError(f"{fixed} come from the tokenizer and cannot be overridden")
    rope = _rope_fields(config_cls, overrides)  # pops rope_* keys from overrides
    known = set(vars(config_cls()))
    unknown = sorted(k for k in overrides if k not in known and k not in _EXTRA_FIELDS)
    if unknown:
        raise ValueError(
            f"{config_cls.__name__} ({family}) has no field(s) {unknown}; "
            "check the spelling or the family (e.g. qwen2 always has q/k/v bias, "
            "mistral never does)"
        )

    tokenizer_len = len(tokenizer)
    fields: dict[str, Any] = {"vocab_size": tokenizer_len}
    fields.update(_COMMON_CONFIG)
    fields.update(_FAMILY_CONFIG[family])
    fields.update(PRESETS[preset]["config"])
    if family in _HEAD_DIM_FAMILIES:  # their default head_dim (128) ignores hidden_size
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    for common, own in _FIELD_NAMES.get(family, {}).items():
        value = fields.pop(common, None)
        if own is not None and value is not None:
            fields[own] = value
    fields.update(rope)
    fields.update(overrides)
    fields.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if fields["vocab_size"] < tokenizer_len:
        raise ValueError(
            f"vocab_size={fields['vocab_size']} is smaller than the tokenizer ({tokenizer_len} tokens)"
        )
    return config_cls(**fields)


def _rope_fields(config_cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn rope_scaling / rope_theta / rope_parameters overrides into config kwargs.

    transformers 5 folded rope_scaling and rope_theta into one rope_parameters
    dict; older versions want them separately.
    """
    import inspect

    scaling = overrides.pop("rope_scaling", None)
    theta = overrides.pop("rope_theta", None)
    params = overrides.pop("rope_parameters", None)
    if scaling is not None and not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")

    if "rope_parameters" not in inspect.signature(config_cls.__init__).parameters:
        legacy = dict(params or {})
        legacy.update(scaling or {})
        theta = theta if theta is not None else legacy.pop("rope_theta", _DEFAULT_ROPE_THETA)
        return {"rope_theta": theta, "rope_scaling": legacy or None}

    merged: dict[str, Any] = {"rope_type": "default", "rope_theta": _DEFAULT_ROPE_THETA}
    merged.update(params or {})
    if scaling:
        scaling = dict(scaling)
        # Old checkpoints spell the key "type".
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        merged.update(scaling)
    if theta is not None:
        merged["rope_theta"] = float(theta)
    return {"rope_parameters": merged}


def _make_tokenizer(vocab_size: int, family: str) -> Any:
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_train_tokenizer_json(vocab_size))
    if family in _NFC_FAMILIES:
        # transformers 5 loads every qwen2 checkpoint as Qwen2Tokenizer, which
        # forces NFC; saying so in tokenizer.json keeps both loaders identical.
        tok.normalizer = normalizers.NFC()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Written as null: otherwise Qwen2Tokenizer appends its default unk
        # "<|endoftext|>", growing the tokenizer past the model's vocab_size.
        unk_token=None,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@functools.lru_cache(maxsize=4)
def _train_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per vocab size; cached as an immutable string."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    # The same split Qwen2Tokenizer imposes on load; llama/mistral load
    # tokenizer.json verbatim, so one pre-tokenizer serves all families.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front, so text the corpus never shows still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS_PATH.read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    assert bos_id == SPECIAL_TOKENS.index(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok.to_str()


def _remove_old_weights(out: Path) -> None:
    # A previous build with different sharding would leave shards or an index
    # that loaders could pick up next to the new weights.
    for path in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        path.unlink()


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw  # bare strings such as hidden_act=gelu
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a random-weight Hugging Face checkpoint with a local tokenizer."
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default=None, help='e.g. "200KB"; writes an index')
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override, value parsed as JSON (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        overrides = _parse_set(args.overrides)
        out = build_tiny_model(
            args.out_dir, family=args.family, preset=args.preset, dtype=args.dtype,
            seed=args.seed, max_shard_size=args.max_shard_size, **overrides,
        )
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))

    from safetensors import safe_open

    params = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                params += math.prod(f.get_slice(name).get_shape())
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {out} ({args.family}/{args.preset}, {args.dtype}): "
          f"{params:,} parameters, {total / 1e6:.2f} MB in {len(files)} files")
    for p in files:
        print(f"  {p.name:40s} {p.stat().st_size:>12,d} B")


if __name__ == "__main__":
    main()
