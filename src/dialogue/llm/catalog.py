"""The hosted models a user can pick (`list_models`: `dialogue models`, the web's model picker),
listed without importing their SDKs: a listing needs names and whether a key is set, not the
`anthropic` and `openai` packages (over a second to import). Any other claude-*, gpt-*, o1/o3/o4*
name works too; these are the ones offered."""
from __future__ import annotations

import importlib.util
import os
import re
from fnmatch import fnmatchcase

from .base import ModelInfo, ProviderError, register_models

__all__ = ["ANTHROPIC_MODELS", "OPENAI_MODELS", "COMPATIBLE", "anthropic_models", "openai_models",
           "VISION_ENV", "sees_images", "CONTEXT_ENV", "context_window"]

ANTHROPIC_MODELS = ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5")
OPENAI_MODELS = ("gpt-5", "gpt-5-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini")
COMPATIBLE = "openai-compatible:"
VISION_ENV = "DIALOGUE_VISION_MODELS"
# OpenAI models that take no image input (every other gpt-*/o*/chatgpt-* model does)
_OPENAI_TEXT_ONLY = ("gpt-3.5", "gpt-4-0314", "gpt-4-0613", "gpt-4-32k", "o1-mini", "o1-preview",
                     "o3-mini")


def sees_images(model: str) -> bool:
    """Whether `model` takes images: every Claude model since Claude 3; OpenAI's but the older
    text-only ones; a local GGUF model never (llama.cpp serves text only here); any other name
    (an openai-compatible server's, a serving engine's) only when the user lists it in
    `VISION_ENV` (full names, comma or space separated, fnmatch's * and ?, e.g.
    ``openai-compatible:http://gpu-box:8000/v1#*-VL-*``): what a server runs is unknown."""
    if model.startswith("claude-"):
        return True
    if model.startswith("local:"):
        return False
    if model.startswith(("gpt-", "o1", "o3", "o4", "chatgpt-")):
        return model != "gpt-4" and not model.startswith(_OPENAI_TEXT_ONLY)
    pats = [p for p in re.split(r"[\s,]+", os.environ.get(VISION_ENV, "")) if p]
    return any(fnmatchcase(model, p) for p in pats)


CONTEXT_ENV = "DIALOGUE_CONTEXT_WINDOW"
# Hosted models' context windows in tokens (input and output together), as their makers document
# them: the longest matching prefix wins. Claude: 200,000 for every model since Claude 2.1 (the
# 1M-token beta needs a header we do not send). OpenAI per family; a name none matches is unknown.
_WINDOWS: dict[str, int] = {
    "claude-": 200_000, "claude-2.0": 100_000, "claude-instant": 100_000,
    "gpt-5": 400_000, "gpt-4.1": 1_047_576, "gpt-4o": 128_000, "chatgpt-4o": 128_000,
    "gpt-4-turbo": 128_000, "gpt-4-0125": 128_000, "gpt-4-1106": 128_000, "gpt-4-32k": 32_768,
    "gpt-4": 8_192, "gpt-3.5-turbo": 16_385, "o1": 200_000, "o1-mini": 128_000,
    "o1-preview": 128_000, "o3": 200_000, "o4-mini": 200_000,
}


def _window_setting(model: str) -> tuple[int | None, int | None]:
    """`CONTEXT_ENV` read for `model`: (the first PATTERN=TOKENS entry whose fnmatch pattern
    matches the full name, a bare TOKENS entry), either None. Entries are separated by commas or
    white space; one that is not a positive whole number of tokens is an error naming it (a
    setting the user wrote is never silently ignored)."""
    match = bare = None
    for entry in (e for e in re.split(r"[\s,]+", os.environ.get(CONTEXT_ENV, "")) if e):
        pat, eq, n = entry.rpartition("=")
        if not n.replace("_", "").isdigit() or int(n) <= 0 or (eq and not pat):
            raise ProviderError(f"{CONTEXT_ENV}: cannot read {entry!r}: write TOKENS (for every "
                             "model whose window is not known) or MODEL_PATTERN=TOKENS, e.g. "
                             "'openai-compatible:http://gpu-box:8000/v1#*=32768'")
        if not eq:
            bare = bare or int(n)
        elif match is None and fnmatchcase(model, pat):
            match = int(n)
    return match, bare


def context_window(model: str) -> int | None:
    """The context window of a hosted `model` in tokens, or None when it is not known (then no
    budget applies: nothing is dropped or cut to fit). The user's `CONTEXT_ENV` wins (a
    ``PATTERN=TOKENS`` entry: a compatible server's ``--max-model-len``, or a smaller budget for
    a Claude model); then the table of Claude and OpenAI families; then a bare ``TOKENS`` entry
    (any other model). A compatible server is not asked: what it reports differs by server (vLLM's
    /v1/models has ``max_model_len``, others nothing), and a window read over the network on every
    request is a slow, failing dependency of building one."""
    match, bare = _window_setting(model)
    if match is not None:
        return match
    name = "" if model.startswith(COMPATIBLE) else model
    known = max((p for p in _WINDOWS if name.startswith(p)), key=len, default=None)
    return _WINDOWS[known] if known else bare


def _installed(sdk: str) -> bool:
    """Whether an SDK could be imported (found, not imported): a provider without one is not offered."""
    return importlib.util.find_spec(sdk) is not None


def anthropic_models() -> list[ModelInfo]:
    """The Claude models offered, ready when ANTHROPIC_API_KEY is set."""
    if not _installed("anthropic"):
        return []
    key = bool(os.environ.get("ANTHROPIC_API_KEY"))
    about = "key set" if key else "set ANTHROPIC_API_KEY to use"
    return [ModelInfo(m, m, "Anthropic API", about, key, images=sees_images(m))
            for m in ANTHROPIC_MODELS]


def openai_models() -> list[ModelInfo]:
    """The OpenAI models offered (ready when OPENAI_API_KEY is set), and the form of name for any
    server that speaks the OpenAI API."""
    if not _installed("openai"):
        return []
    key = bool(os.environ.get("OPENAI_API_KEY"))
    about = "key set" if key else "set OPENAI_API_KEY to use"
    return [*(ModelInfo(m, m, "OpenAI API", about, key, images=sees_images(m)) for m in OPENAI_MODELS),
            ModelInfo(f"{COMPATIBLE}<base_url>/<model>", where="any server speaking the OpenAI API",
                      ready=False, template=True)]


register_models(anthropic_models)
register_models(openai_models)
