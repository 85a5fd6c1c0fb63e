"""The artifact's tokenizer as `tokenizers` alone can run it (no transformers at load).

Importing transformers costs ~0.75 s of a cold start whose other parts take
about as long in total; all a generate step needs from it is the `tokenizers`
model it builds (with the post-processor it sets from add_bos_token and
friends). The compiler has transformers anyway: it saves that effective
backend as `runtime_tokenizer.json`, with the few attributes the runtime
reads, and only after checking on probe texts that it encodes and decodes
exactly as the transformers tokenizer does. Where it does not (a slow
tokenizer, decode clean-up, split special tokens), no snapshot is written and
the runtime loads transformers as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from aotllm.graphs.manifest import RUNTIME_TOKENIZER_FILE

logger = logging.getLogger(__name__)

_PROBES = (
    "The capital of France is",
    "  Leading spaces, trailing space ",
    "Hello , world ! isn't it ? I'm sure they've gone .",
    "Numbers 1234567 and 3.14159; code: def f(x): return x**2\n\tnext line\r\n",
    "Ünïcödé — “quotes” ½ 東京 🙂 \u00a0nbsp",
    "",
)


def _agrees(hf: Any, snapshot: Any, texts: list[str]) -> bool:
    for text in texts:
        for special in (True, False):
            ids = hf.encode(text, add_special_tokens=special)
            if snapshot.encode(text, add_special_tokens=special).ids != ids:
                return False
            for skip in (True, False):
                if snapshot.decode(ids, skip_special_tokens=skip) != hf.decode(
                        ids, skip_special_tokens=skip):
                    return False
    return True


def write_runtime_tokenizer(out_dir: Path) -> dict | None:
    """Writes the snapshot next to the tokenizer files `out_dir` holds and returns
    the manifest record (`extra["runtime_tokenizer"]`), or None if it would not
    behave exactly as transformers' tokenizer of `out_dir`."""
    from tokenizers import Tokenizer

    from aotllm.models.checkpoint import hf_tokenizer

    hf = hf_tokenizer(out_dir)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or getattr(hf, "split_special_tokens", False):
        logger.info("The tokenizer is not a plain fast tokenizer: the runtime will load it "
                    "through transformers")
        return None
    snapshot = Tokenizer.from_str(backend.to_str())
    snapshot.no_truncation()
    snapshot.no_padding()
    specials = [str(t) for t in getattr(hf, "all_special_tokens", [])]
    texts = [*_PROBES, *(f"a{t}b {t}" for t in specials[:8])]
    if not _agrees(hf, snapshot, texts):
        logger.info("The tokenizer's transformers wrapper changes what `tokenizers` gives "
                    "(decode clean-up?): the runtime will load it through transformers")
        return None
    snapshot.save(str(out_dir / RUNTIME_TOKENIZER_FILE))
    return {"file": RUNTIME_TOKENIZER_FILE, "bos_token_id": hf.bos_token_id,
            "eos_token_id": hf.eos_token_id}
