"""Chat templates: the built-in ones and the one rule that picks a model's template.

Serving (`local.runtime`) and training (`train.quant.serving_chat_template`) both go through
`chat_template`, so an adapter is trained on exactly the turn markers the runtime will show it.
The rule: a model's built-in `chat_format` if its name has one (`ModelSpec.chat_format`, e.g.
"gemma" for a base GGUF that carries no template), else the model's own template, else ChatML
for a GGUF (llama.cpp serves every GGUF somehow) and none for anything else.
"""
from __future__ import annotations

__all__ = ["CHATML_TEMPLATE", "GEMMA_TEMPLATE", "BUILTIN_TEMPLATES", "CHAT_FORMATS", "UnknownChatFormatError",
           "chat_template"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

# Gemma has no system role: like Google's own template, the system text opens the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first "
    "else '') + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}
CHAT_FORMATS = tuple(BUILTIN_TEMPLATES)


class UnknownChatFormatError(ValueError):
    """A `chat_format` that names no built-in template."""


def chat_template(chat_format: str | None, own: str | None, *, is_gguf: bool = True) -> tuple[str | None, str]:
    """(template or None, where it came from: "builtin:<format>", "own", "fallback:chatml" or
    "none"). `own` is the model's own template (a GGUF's `tokenizer.chat_template`, a tokenizer's
    `chat_template`); `is_gguf` False (a Hugging Face directory, which llama.cpp does not serve)
    means no ChatML fallback."""
    if chat_format is not None:
        if chat_format not in BUILTIN_TEMPLATES:
            raise UnknownChatFormatError(f"unknown chat format {chat_format!r}: use one of "
                                         f"{', '.join(BUILTIN_TEMPLATES)} or none (the model's own template)")
        return BUILTIN_TEMPLATES[chat_format], f"builtin:{chat_format}"
    if own:
        return own, "own"
    if is_gguf:
        return CHATML_TEMPLATE, "fallback:chatml"
    return None, "none"
