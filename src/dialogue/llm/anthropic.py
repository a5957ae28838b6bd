"""Claude through the official `anthropic` SDK (AsyncAnthropic, Messages API, streaming).

A thin adapter: `Request` -> Messages API body, SSE events -> `Event`s, SDK errors -> our errors.

Prompt caching. The request's stable prefix is marked with `cache_control` breakpoints so a long
pinned context is written to Anthropic's cache once and read (at a tenth of the price) by every
later prompt: one at the end of the system blocks (system prompt, then the attached context as
its own block), one on each turn marked `Turn.cache` (the context builder marks the end of the
stable prefix), and one on the last message, so the next prompt reads this whole conversation
from the cache. The API allows four breakpoints: when more turns are marked, the latest win.

Prefill. `request.prefill` becomes a trailing assistant turn and Claude continues it. The stream
does NOT repeat the prefill: the caller already has it and appends what we emit. The API rejects
a final assistant turn that ends in whitespace, so trailing whitespace is cut from the prefill we
send, and the same whitespace is then dropped from the start of the continuation (the model
usually begins by writing it back), so that prefill + emitted text reads as the model wrote it.

Retries. The SDK's own (see `hosted`): a failed connection, 408, 409, 429, 529 and 5xx, honouring
retry-after and x-should-retry. Only opening the stream is retried: once a text delta has reached
the caller, a failure is raised, never retried: a retry would repeat text.

Temperature. SDK 2.x no longer has a `temperature` argument; a request's temperature is sent as
an extra body field, and a model that takes none answers 400, which surfaces as a ProviderError.

Keys. `ANTHROPIC_API_KEY` (or `ANTHROPIC_AUTH_TOKEN`, or an SDK profile); `ANTHROPIC_BASE_URL`
points the SDK elsewhere (tests point it at a local replay server).
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import anthropic as sdk

from .base import (
    ContextTooLongError, Done, Event, MissingKeyError, OverloadedError, ProviderError,
    ProviderNetworkError, RateLimitError, Request, TextDelta, Turn, UnknownModelError,
    Usage, parse_retry_after, register, tool_call_from_json,
)
from .catalog import ANTHROPIC_MODELS as MODELS, anthropic_models as models  # noqa: F401 - listed there, no SDK needed
from .hosted import HostedProvider, asked_wait, error_body

__all__ = ["AnthropicProvider", "MODELS", "models"]

_STOP = {"end_turn": "end", "pause_turn": "end", "max_tokens": "max_tokens", "stop_sequence": "stop",
         "tool_use": "tool_use", "refusal": "refusal", "model_context_window_exceeded": "max_tokens"}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_MAX_BREAKPOINTS = 4
_EPHEMERAL = {"type": "ephemeral"}


class AnthropicProvider(HostedProvider):
    """Streams `claude-*` models. `api_key` / `base_url` override the environment."""

    name = "anthropic"
    connection_error = sdk.APIConnectionError
    sees_images = True  # every Claude model since Claude 3 takes image blocks

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 attempts: int = 4, timeout: float = 600.0) -> None:
        super().__init__(attempts=attempts, timeout=timeout)
        self.model = model
        self.api_key = api_key
        self.base_url = base_url

    def _new_client(self) -> sdk.AsyncAnthropic:
        kw: dict[str, Any] = self._client_options(sdk)
        if self.api_key:
            kw["api_key"] = self.api_key
        if self.base_url:
            kw["base_url"] = self.base_url
        try:
            client = sdk.AsyncAnthropic(**kw)
        except Exception as e:  # noqa: BLE001 - e.g. a profile named but not on disk
            raise self._error(e) from e
        if not (client.api_key or client.auth_token or getattr(client, "credentials", None)):
            raise MissingKeyError(
                f"no Anthropic API key for {self.model!r}: set ANTHROPIC_API_KEY "
                "(https://console.anthropic.com/settings/keys)")
        return client

    def _where(self) -> str:
        return self.base_url or "the Anthropic API"

    # ------------------------------------------------------------ request

    def build_body(self, request: Request) -> dict[str, Any]:
        """The Messages API body for `request` (public so tests and tools can inspect it)."""
        if request.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {request.max_tokens}")
        system: list[dict[str, Any]] = []
        if request.system:
            system.append({"type": "text", "text": request.system})
        if request.context:
            system.append({"type": "text", "text": request.context})
        messages = _messages(request.messages)
        prefill = request.prefill.rstrip()
        if prefill:
            if messages and messages[-1]["role"] == "assistant":
                raise ValueError("a request cannot end with an assistant turn and also carry a prefill")
            messages.append({"role": "assistant", "content": prefill})

        # Breakpoints: end of system (covers tools, which precede it), marked turns, last message.
        budget = _MAX_BREAKPOINTS
        if system:
            system[-1]["cache_control"] = dict(_EPHEMERAL)
            budget -= 1
        n = len(request.messages)
        marked = [i for i, t in enumerate(request.messages) if t.cache]
        if n and (n - 1) not in marked:
            marked.append(n - 1)
        targets = set(marked[-budget:]) if budget > 0 else set()
        for msg in messages:
            for block in msg["content"] if isinstance(msg["content"], list) else []:
                if block.pop("_turn", None) in targets and block.pop("_last", False):
                    block["cache_control"] = dict(_EPHEMERAL)
                block.pop("_last", None)

        body: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens, "messages": messages}
        if system:
            body["system"] = system
        if request.tools:
            body["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.parameters}
                             for t in request.tools]
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        return body

    # ------------------------------------------------------------ stream

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        """Text deltas (not repeating the prefill), tool calls, then usage and `Done`."""
        body = self.build_body(request)
        client = self._client()
        sent = request.prefill.rstrip()
        ws = request.prefill[len(sent):] if sent else ""  # whitespace cut from the prefill we sent

        kwargs = dict(body)
        if "temperature" in kwargs:
            # SDK 2.x dropped `temperature` from create(); the API still takes it for the models
            # that sample with one, and a model that does not answers 400 (a clear ProviderError).
            kwargs["extra_body"] = {"temperature": kwargs.pop("temperature")}

        stream = await self._open(lambda: client.messages.create(**kwargs, stream=True))
        usage = Usage()
        stop = "end"
        tools: dict[int, list[Any]] = {}  # index -> [id, name, json text]
        finished = False
        try:
            async with stream:
                async for ev in stream:
                    kind = ev.type
                    if kind == "content_block_delta":
                        d = ev.delta
                        if d.type == "text_delta":
                            text = d.text
                            if ws:
                                k = 0
                                while k < len(ws) and k < len(text) and text[k] == ws[k]:
                                    k += 1
                                text, ws = text[k:], (ws[k:] if k == len(text) else "")
                            if text:
                                yield TextDelta(text)
                        elif d.type == "input_json_delta" and ev.index in tools:
                            tools[ev.index][2] += d.partial_json
                    elif kind == "content_block_start":
                        block = ev.content_block
                        if block.type == "tool_use":
                            tools[ev.index] = [block.id, block.name, ""]
                    elif kind == "content_block_stop":
                        if ev.index in tools:
                            yield tool_call_from_json(*tools.pop(ev.index))
                    elif kind == "message_start":
                        usage = _usage(ev.message.usage, usage)
                    elif kind == "message_delta":
                        usage = _usage(ev.usage, usage)
                        if ev.delta.stop_reason:
                            stop = _STOP.get(ev.delta.stop_reason, ev.delta.stop_reason)
                    elif kind == "message_stop":
                        finished = True
        except ProviderError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(e, streaming=True) from e
        if not finished:
            raise ProviderNetworkError(f"{self.model}: the stream ended before the answer was complete "
                                       "(no message_stop); the connection was probably cut")
        yield usage
        yield Done(stop)

    # ------------------------------------------------------------ errors

    def _error(self, e: BaseException, streaming: bool = False) -> ProviderError:
        """Translate an SDK or transport error into one the user can act on. `streaming`: the
        stream had opened, so a connection error means it broke mid-answer."""
        if (low := self._transport_error(e, streaming)) is not None:
            return low
        if isinstance(e, getattr(sdk, "CredentialsError", ())):
            return MissingKeyError(f"no usable Anthropic credentials for {self.model!r}: set ANTHROPIC_API_KEY "
                                   f"(the SDK said: {e})")
        if isinstance(e, sdk.APIStatusError) or isinstance(e, sdk.APIError):
            status = getattr(e, "status_code", None)
            etype, msg = _error_fields(e)
            headers = getattr(getattr(e, "response", None), "headers", None)
            if status == 429 or etype == "rate_limit_error":
                err: ProviderError = RateLimitError(f"{self.model}: rate limited by Anthropic: {msg}{asked_wait(e)}")
                err.retry_after = parse_retry_after(headers)  # type: ignore[attr-defined]
                return err
            if status == 529 or etype in ("overloaded_error", "api_error") or (status and status >= 500):
                err = OverloadedError(f"{self.model}: Anthropic is overloaded or failing ({status or etype}): "
                                      f"{msg}{asked_wait(e)}")
                err.retry_after = parse_retry_after(headers)  # type: ignore[attr-defined]
                return err
            if status == 401 or etype == "authentication_error":
                return MissingKeyError(f"Anthropic rejected the API key (check ANTHROPIC_API_KEY): {msg}")
            if status == 404 or etype == "not_found_error":
                return UnknownModelError(f"Anthropic does not know the model {self.model!r}: {msg}")
            low = msg.lower()
            if status == 413 or "prompt is too long" in low or "context window" in low:
                return ContextTooLongError(f"{self.model}: the prompt is too long for the model: {msg}")
            return ProviderError(f"{self.model}: Anthropic API error {status or ''} {etype or ''}: {msg}".replace("  ", " "))
        return ProviderError(f"{self.model}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- helpers

def _error_fields(e: BaseException) -> tuple[str, str]:
    """(error.type, error.message) from the error body, whatever the SDK version."""
    body = error_body(e)
    if body is not None and ("type" in body or "message" in body):
        return str(body.get("type") or ""), str(body.get("message") or e)
    return "", str(getattr(e, "message", None) or e)


def _usage(u: Any, prev: Usage) -> Usage:
    """Anthropic's input_tokens already excludes cache reads and writes; message_delta repeats
    the counts cumulatively (fields may be None), so the latest non-None value wins."""
    if u is None:
        return prev

    def pick(name: str, old: int) -> int:
        v = getattr(u, name, None)
        return old if v is None else int(v)

    return Usage(input=pick("input_tokens", prev.input), output=pick("output_tokens", prev.output),
                 cache_read=pick("cache_read_input_tokens", prev.cache_read),
                 cache_write=pick("cache_creation_input_tokens", prev.cache_write))


def _content(turn: Turn, index: int) -> list[dict[str, Any]]:
    """Content blocks of a user/assistant turn. Blocks carry private `_turn`/`_last` markers so
    `build_body` can place cache breakpoints after merging turns; it strips them."""
    blocks: list[dict[str, Any]] = []
    for p in turn.parts():
        if p.type == "image":
            if p.mime not in _IMAGE_TYPES:
                raise ValueError(f"Claude accepts images of type {', '.join(_IMAGE_TYPES)}, not {p.mime!r}")
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": p.mime, "data": p.data}})
        elif p.text:  # the API rejects empty text blocks
            blocks.append({"type": "text", "text": p.text})
    if turn.role == "assistant":
        for c in turn.tool_calls:
            blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments})
    if turn.role == "tool":
        inner = [{k: v for k, v in b.items()} for b in blocks]
        blocks = [{"type": "tool_result", "tool_use_id": turn.tool_call_id, "content": inner or ""}]
    for b in blocks:
        b["_turn"] = index
    if blocks:
        blocks[-1]["_last"] = True
    return blocks


def _messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Turns -> Messages API messages. Tool results are user content; consecutive turns of the
    same role are merged (the API wants tool results in the user message right after the call,
    and alternating roles)."""
    out: list[dict[str, Any]] = []
    for i, t in enumerate(turns):
        role = "user" if t.role in ("user", "tool") else "assistant"
        if t.role == "tool" and not t.tool_call_id:
            raise ValueError(f"tool turn {i} has no tool_call_id")
        blocks = _content(t, i)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            prev = out[-1]["content"]
            # tool results must lead the user message they share
            if t.role == "tool":
                k = sum(1 for b in prev if b["type"] == "tool_result")
                prev[k:k] = blocks
            else:
                prev.extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


register("claude-", lambda model: AnthropicProvider(model))
