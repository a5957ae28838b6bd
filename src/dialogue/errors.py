"""The errors a model call can end in, below every package: the providers (llm/), the local model
(local/) and the GGUF files (gguf/) raise them, and surfaces catch them through the service.
`dialogue.llm.base` re-exports them."""
from __future__ import annotations

__all__ = ["ProviderError", "MissingKeyError", "UnknownModelError", "ContextTooLongError",
           "ProviderNetworkError", "RateLimitError", "OverloadedError", "ImagesNotSupportedError"]


class ProviderError(Exception):
    """A model call failed for a reason the user can act on; the message says which."""


class MissingKeyError(ProviderError):
    pass


class UnknownModelError(ProviderError):
    pass


class ContextTooLongError(ProviderError):
    pass


class ImagesNotSupportedError(ProviderError):
    """The request holds images the user attached and the model cannot see images: refused
    before anything is sent (runs.Runs.request), never silently dropped."""


class ProviderNetworkError(ProviderError):
    """The server could not be reached or the connection broke."""


class RateLimitError(ProviderError):
    """429: retried with backoff. `retry_after`: the server's Retry-After in seconds, if it sent one."""

    retry_after: float | None = None


class OverloadedError(ProviderError):
    """5xx / 529: retried with backoff. `retry_after` as for `RateLimitError`."""

    retry_after: float | None = None
