"""Chat templating: one place for `LLM.chat`, the OpenAI server and /tokenize.

Messages use the OpenAI shape: a role and a content that is a string or a
list of parts, of which only text parts are supported (this runtime has no
image or audio inputs). The template comes from the artifact's tokenizer
files unless a caller passes one.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


def _text_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                    f"supported, got {kind!r}"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks a conversation and flattens text parts into plain strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"{where} must be a dict with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ValueError(f"{where}: role must be one of {', '.join(ROLES)}; "
                             f"got {msg['role']!r}")
        out.append({**msg, "content": _text_content(msg.get("content"), where)})
    return out


def apply_chat_template(
    tokenizer,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> tuple[str, list[int]]:
    """The prompt text and token ids of one conversation.

    The template writes the special tokens itself, so none are added again.
    Raises ValueError when there is no template or the template rejects the
    conversation (e.g. roles that do not alternate).
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template=, or send plain "
            "completions (LLM.generate, /v1/completions)"
        )
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    messages = normalize_messages(messages)
    try:
        ids = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            return_dict=False,
        )
    except Exception as e:  # jinja2's TemplateError, or the template's raise_exception
        if isinstance(e, (MemoryError, RecursionError)):
            raise
        raise ValueError(f"the chat template failed on these messages: {e}") from None
    ids = list(ids)
    return tokenizer.decode(ids), ids
