"""POST /tokenize and /detokenize (vLLM's extension routes)."""

from __future__ import annotations

from typing import Any

from aotllm.runtime.entrypoints.openai.protocol import (
    DetokenizeRequest, OpenAIError, TokenizeRequest)
from aotllm.runtime.entrypoints.openai.serving_chat import OpenAIServingChat


class OpenAIServingTokenization(OpenAIServingChat):
    def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("send exactly one of 'prompt' (text) or 'messages' (a chat)",
                              param="prompt")
        if req.messages is not None:
            _, ids = self.render(req.messages, req.add_generation_prompt,
                                 req.continue_final_message)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": list(ids)}

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        vocab = self.engine.engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"token id {bad[0]} is out of vocabulary (the model has {vocab} "
                              "tokens)", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}
