"""The hosted models a user can pick (`list_models`: `dialogue models`, the web's model picker),
listed without importing their SDKs: a listing needs names and whether a key is set, not the
`anthropic` and `openai` packages (over a second to import). Any other claude-*, gpt-*, o1/o3/o4*
name works too; these are the ones offered."""
from __future__ import annotations

import importlib.util
import os
import re
from fnmatch import fnmatchcase

from .base import ModelInfo, register_models

__all__ = ["ANTHROPIC_MODELS", "OPENAI_MODELS", "COMPATIBLE", "anthropic_models", "openai_models",
           "VISION_ENV", "sees_images"]

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
