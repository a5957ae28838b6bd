"""What the hosted-API providers (Anthropic, OpenAI and OpenAI-compatible servers) share: one SDK
client per event loop, closing it, opening a stream under the one retry policy
(`base.with_retries`, the SDKs' own retries off), and the first, transport-level step of turning
an SDK error into a ProviderError. Each provider keeps what differs: building the body, reading
its stream, and its API's error codes."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from .base import ProviderError, ProviderNetworkError, with_retries

__all__ = ["HostedProvider", "TRANSPORT_ERRORS", "error_body"]

# The SDKs stream over httpx2 (SDK >= 2) or httpx (older SDKs); a connection that breaks while a
# stream is read surfaces as the transport library's error, not the SDK's, so catch both.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = ()
for _mod in ("httpx2", "httpx"):
    try:
        TRANSPORT_ERRORS += (__import__(_mod).TransportError,)
    except (ImportError, AttributeError):
        pass


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

    def __init__(self, *, attempts: int = 4, backoff: float = 0.5, timeout: float = 600.0) -> None:
        self.attempts = attempts
        self.backoff = backoff  # first retry delay in seconds; doubles per attempt
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client_: Any = None

    model: str

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
        """Open a stream with `call()` under the retry policy; errors come out translated."""
        async def attempt() -> Any:
            try:
                return await call()
            except Exception as e:  # noqa: BLE001 - every SDK error is translated
                raise self._error(e) from e
        return await with_retries(attempt, attempts=self.attempts, base=self.backoff)

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
