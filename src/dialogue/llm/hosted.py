"""What the hosted-API providers (Anthropic, OpenAI and OpenAI-compatible servers) share: one SDK
client per event loop, closing it, the retry policy, and the first, transport-level step of
turning an SDK error into a ProviderError. Each provider keeps what differs: building the body,
reading its stream, and its API's error codes.

Retries are the SDKs' own (`max_retries`): they retry a failed connection or a timeout, 408, 409,
429 and 5xx (Anthropic's 529 included), with exponential backoff and jitter, honour
`retry-after-ms` / `retry-after`, and obey the APIs' `x-should-retry` header either way. Only the
opening of a stream is retried: once text has reached the user a retry would repeat it, and a
break mid-stream is raised. One thing is ours: a server that asks for a wait longer than
`MAX_RETRY_AFTER` seconds gets no retry (the Anthropic SDK would sleep as long as it is told,
hours if need be): the error surfaces at once and says how long the server asked for.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from .base import ProviderError, ProviderNetworkError, parse_retry_after

__all__ = ["HostedProvider", "TRANSPORT_ERRORS", "error_body", "MAX_RETRY_AFTER", "asked_wait"]

#: the longest Retry-After (seconds) we wait for before a retry; a longer one fails the request
MAX_RETRY_AFTER = 60.0

# The SDKs stream over httpx2; a connection that breaks while a stream is read surfaces as its
# error, not the SDK's, so catch it too. (It comes with the SDKs: not a dependency of ours.)
try:
    from httpx2 import TransportError as _TransportError
    TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (_TransportError,)
except ImportError:  # pragma: no cover - an SDK release that moved off httpx2
    TRANSPORT_ERRORS = ()


async def _no_retry_after_long_waits(response: Any) -> None:
    """An httpx response hook, run before the SDK decides whether to retry: a Retry-After beyond
    `MAX_RETRY_AFTER` gets `x-should-retry: false`, which both SDKs obey. The header is the SDKs'
    documented switch; overriding their private retry methods would break with any release."""
    wait = parse_retry_after(response.headers, cap=float("inf"))
    if wait is not None and wait > MAX_RETRY_AFTER:
        response.headers["x-should-retry"] = "false"


def asked_wait(e: BaseException) -> str:
    """The note " (the server asks to wait N s ...)" when an error's response asked for a wait too
    long to retry after, else ""."""
    headers = getattr(getattr(e, "response", None), "headers", None)
    wait = parse_retry_after(headers, cap=float("inf"))
    if wait is None or wait <= MAX_RETRY_AFTER:
        return ""
    return f" (the server asks to wait {wait:.0f} s before trying again)"


def error_body(e: BaseException) -> dict[str, Any] | None:
    """The JSON error body an SDK error carries (a dict or a JSON string, depending on the SDK
    version and the server), with a nested "error" object unwrapped; None if there is none."""
    body = getattr(e, "body", None)
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    return body if isinstance(body, dict) else None


class HostedProvider:
    """Base of the SDK-backed providers. Subclasses set `model` and implement `_new_client()`
    (raising MissingKeyError when there is no key), `_error()` and `stream()`."""

    #: the SDK's "could not connect" exception class; set by subclasses
    connection_error: type[BaseException] = OSError

    def __init__(self, *, attempts: int = 4, timeout: float = 600.0) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.attempts = attempts  # tries in all: the SDK's max_retries is one fewer
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client_: Any = None

    #: more httpx response hooks (async functions of the response), run before the SDK decides
    #: whether to retry; a subclass adds its API's own no-retry cases
    response_hooks: tuple[Callable[[Any], Awaitable[None]], ...] = ()

    def _client_options(self, sdk: Any) -> dict[str, Any]:
        """The retry, timeout and HTTP-client arguments both SDKs' async clients take."""
        hooks = [_no_retry_after_long_waits, *type(self).response_hooks]
        return {"max_retries": self.attempts - 1, "timeout": self.timeout,
                "http_client": sdk.DefaultAsyncHttpxClient(event_hooks={"response": hooks})}

    model: str

    @property
    def context_window(self) -> int | None:
        """The model's context in tokens (`catalog.context_window`: the user's setting, else the
        table of known models), None when unknown: the service budgets requests by it."""
        from .catalog import context_window
        return context_window(getattr(self, "full_name", self.model))

    def count_tokens(self, text: str) -> int | None:
        # Hosted tokenizers are not available offline (Claude's is not public; tiktoken downloads
        # its tables at run time; compatible servers serve arbitrary models): the context builder
        # falls back to its estimate.
        return None

    def _new_client(self) -> Any:
        raise NotImplementedError

    def _client(self) -> Any:
        """One client per event loop: an async HTTP pool belongs to the loop that opened it."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client_ is None:
            self._client_ = self._new_client()
            self._loop = loop
        return self._client_

    async def aclose(self) -> None:
        """Close the pooled HTTP connections. Optional (a process that keeps one provider for its
        life need not), but a test or a short script that opens its own event loop should."""
        client, self._client_, self._loop = self._client_, None, None
        if client is not None:
            await client.close()

    async def _open(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Open a stream with `call()` (the SDK retries what can be retried); errors come out
        translated."""
        try:
            return await call()
        except Exception as e:  # noqa: BLE001 - every SDK error is translated
            raise self._error(e) from e

    def _where(self) -> str:
        raise NotImplementedError

    def _error(self, e: BaseException, streaming: bool = False) -> ProviderError:
        raise NotImplementedError

    def _transport_error(self, e: BaseException, streaming: bool) -> ProviderError | None:
        """The translation of errors below the API (already translated, connection refused, a
        connection cut mid-answer), or None for an API error the subclass reads itself."""
        if isinstance(e, ProviderError):
            return e
        if streaming and isinstance(e, (self.connection_error, *TRANSPORT_ERRORS)):
            return ProviderNetworkError(f"{self.model}: the connection broke mid-answer: {e}")
        if isinstance(e, self.connection_error):
            return ProviderNetworkError(f"could not reach {self._where()}: {e}")
        if isinstance(e, TRANSPORT_ERRORS):
            return ProviderNetworkError(f"{self.model}: the connection to {self._where()} broke "
                                        f"mid-answer: {e}")
        return None
