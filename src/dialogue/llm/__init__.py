"""Language-model providers behind one protocol (see `base`).

Importing this package loads no SDK: the adapters (`anthropic`, `openai`, `local`) are imported the
first time a model name is resolved, so a CLI command that never calls a model stays fast.

    from dialogue.llm import get_provider, Request, Turn
    provider = get_provider("claude-sonnet-4-5")      # or gpt-4.1-mini, local:smollm2, ...
    async for event in provider.stream(Request(model=..., messages=[Turn("user", "hi")])): ...
"""
from .base import *  # noqa: F403 - the package's public API is base's
from .base import __all__  # noqa: F401
