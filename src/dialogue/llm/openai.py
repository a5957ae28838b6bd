"""OpenAI models and any OpenAI-compatible server, through the official `openai` SDK.

Chat Completions, streamed, with ``stream_options={"include_usage": True}`` so the last chunk
carries token counts. The same adapter serves OpenAI itself and the servers that speak its
protocol (vLLM, llama.cpp's server, ``llama_cpp.server``, Ollama): that is how a dialogue moves
from one machine to a cluster.

Model names
-----------
- ``gpt-*``, ``o1*``, ``o3*``, ``o4*``, ``chatgpt-*``: OpenAI's API (``OPENAI_BASE_URL`` honoured);
  needs ``OPENAI_API_KEY``.
- ``openai-compatible:<base_url>/<model>``: the model id is the last path segment, the rest is
  the base URL, e.g. ``openai-compatible:http://127.0.0.1:8000/v1/my-model`` -> base
  ``http://127.0.0.1:8000/v1``, model ``my-model``. A model id that itself contains slashes (vLLM
  serves Hugging Face ids) is written after a ``#`` instead:
  ``openai-compatible:http://gpu-box:8000/v1#meta-llama/Llama-3.1-8B-Instruct``. ``#`` cannot be
  part of a URL sent to a server (it starts a fragment), so the split is unambiguous.

Keys go only where they were configured
---------------------------------------
A model name can come from a file someone else wrote (an imported notebook), so the URL in an
``openai-compatible:`` name is not trusted with a secret. ``OPENAI_COMPATIBLE_API_KEY`` is bound to
the base URLs listed in ``OPENAI_COMPATIBLE_BASE_URL`` (one URL, or several separated by commas or
spaces; compared after normalising scheme, host, default port and a trailing slash) and sent only
to those. Any other compatible URL gets a placeholder key and none of the headers the SDK would
otherwise add from the environment (``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``,
``OPENAI_CUSTOM_HEADERS``). `configured_base` says whether a URL is bound. The user's
``OPENAI_API_KEY`` is never sent to a compatible server at all.

Why a placeholder rather than refusing: most compatible servers a user names by hand (llama.cpp,
vLLM, Ollama on their own machine) need no key, and they keep working without any configuration
whether or not a key for some other server sits in the environment. A server that does need the
key answers 401, and the error says which variable binds the key to it. What a dialogue sends to
an unconfigured URL is the user's own choice of model; an imported notebook cannot make that
choice (the service keeps an imported model only when `configured_base` holds for its URL).

Tool calls
----------
Argument deltas are assembled per call index and each call is emitted as a `ToolCall` with parsed
JSON arguments once the model has finished. Arguments that are not a JSON object (small models
do this) give a `ToolCall` with ``arguments={}`` and ``error`` quoting what the model sent, so the
tool loop can return the error to the model rather than fail the whole answer.

Prefill
-------
The prefill is sent as a trailing assistant message and the stream does not repeat it. Whether the
model *continues* it depends on the server: llama.cpp's own ``llama-server`` continues a final
assistant message; OpenAI's API does not (it answers afresh after it), and neither does
``llama_cpp.server`` 0.3.36 (the Python one: checked, it renders the chat template with a new
generation prompt after the prefill). Use the local provider where a prefill must be continued.

Usage
-----
OpenAI's ``prompt_tokens`` include cached tokens; we report ``input = prompt_tokens -
cached_tokens`` and ``cache_read = cached_tokens`` so costs follow the price table. A server that
sends no usage chunk gets no `Usage` event (``llama_cpp.server`` 0.3.36 ignores ``stream_options``).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import openai as sdk

from .base import (
    ContextTooLongError, Done, Event, MissingKeyError, OverloadedError, ProviderError,
    ProviderNetworkError, RateLimitError, Request, TextDelta, Turn, UnknownModelError,
    Usage, parse_retry_after, register, tool_call_from_json,
)
from .catalog import COMPATIBLE, OPENAI_MODELS as MODELS, openai_models as models  # noqa: F401 - listed there, no SDK needed
from .catalog import sees_images
from .hosted import HostedProvider, asked_wait, error_body

__all__ = ["OpenAIProvider", "parse_compatible", "configured_base", "configured_bases",
           "KEY_ENV", "BASE_URL_ENV", "MODELS", "models"]

KEY_ENV = "OPENAI_COMPATIBLE_API_KEY"
BASE_URL_ENV = "OPENAI_COMPATIBLE_BASE_URL"
_NO_KEY = "sk-no-key-required"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_STOP = {"stop": "end", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
         "content_filter": "refusal"}
_CONTEXT_PHRASES = ("context_length_exceeded", "maximum context length", "context window", "context length",
                    "too many tokens", "prompt is too long")


def parse_compatible(model: str) -> tuple[str, str]:
    """``openai-compatible:<base_url>/<model>`` (or ``<base_url>#<model/with/slashes>``) ->
    (base_url, model id). Raises UnknownModelError with the expected shape on anything else."""
    rest = model[len(COMPATIBLE):] if model.startswith(COMPATIBLE) else model
    if "#" in rest:
        base, _, mid = rest.partition("#")
    else:
        base, _, mid = rest.rpartition("/")  # a trailing slash leaves no model id: an error
    base = base.rstrip("/")
    scheme_ok = base.startswith(("http://", "https://"))
    if not scheme_ok or not mid or base.count("/") < 2 or len(base) <= len("https://"):
        raise UnknownModelError(
            f"cannot read {model!r}: write openai-compatible:<base_url>/<model>, e.g. "
            "openai-compatible:http://127.0.0.1:8000/v1/my-model, or with a model id that contains "
            "slashes openai-compatible:http://host:8000/v1#org/model")
    return base, mid


def _normal_url(url: str) -> str | None:
    """A base URL in one comparable form (scheme and host lower case, the default port written
    out, no trailing slash), or None when it is not an http(s) URL with a host. Two spellings of
    one server compare equal; anything else (another path, port or user) does not."""
    try:
        u = urlsplit(url.strip())
        port = u.port or _DEFAULT_PORTS.get(u.scheme.lower())
    except ValueError:  # a port that is not a number, a malformed IPv6 host
        return None
    scheme = u.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not u.hostname or u.fragment:
        return None
    user = u.netloc.rpartition("@")[0]
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    query = f"?{u.query}" if u.query else ""
    return f"{scheme}://{user + '@' if user else ''}{host}:{port}{u.path.rstrip('/')}{query}"


def configured_bases() -> list[str]:
    """The compatible base URLs the user configured (`BASE_URL_ENV`), normalised."""
    raw = os.environ.get(BASE_URL_ENV, "")
    return [n for u in re.split(r"[\s,]+", raw) if u and (n := _normal_url(u))]


def configured_base(url: str) -> bool:
    """Whether `url` is a compatible base URL the user configured: the only kind that is sent
    `KEY_ENV`, and the only kind an imported notebook's model may name."""
    n = _normal_url(url)
    return n is not None and n in configured_bases()


async def _no_retry_when_out_of_quota(response: Any) -> None:
    """OpenAI answers 429 both to "slow down" and to "your quota is used up"; the SDK retries every
    429, but waiting does not refill a quota. Only an error's short JSON body is read here (and
    kept for the SDK); a stream is left alone."""
    if response.status_code == 429 and "x-should-retry" not in response.headers:
        await response.aread()
        if b"insufficient_quota" in response.content:
            response.headers["x-should-retry"] = "false"


class OpenAIProvider(HostedProvider):
    """Streams OpenAI models or a model on an OpenAI-compatible server (see module docstring)."""

    connection_error = sdk.APIConnectionError
    response_hooks = (_no_retry_when_out_of_quota,)

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 attempts: int = 4, timeout: float = 600.0) -> None:
        super().__init__(attempts=attempts, timeout=timeout)
        self.full_name = model
        self.compatible = model.startswith(COMPATIBLE)
        if self.compatible:
            self.base_url, self.model = parse_compatible(model)
            self.name = "openai-compatible"
        else:
            self.model, self.base_url = model, base_url or os.environ.get("OPENAI_BASE_URL") or None
            self.name = "openai"
        if base_url:
            self.base_url = base_url
        self.api_key = api_key

    @property
    def sees_images(self) -> bool:
        """Whether the model takes image parts (`catalog.sees_images`: OpenAI's own but the
        text-only ones; a compatible server's only when DIALOGUE_VISION_MODELS names it)."""
        return sees_images(self.full_name)

    def _bound(self) -> bool:
        """Whether this provider may send the user's credentials: a key passed in explicitly, the
        OpenAI API, or a compatible server at a configured base URL (see the module docstring)."""
        return bool(self.api_key) or not self.compatible or configured_base(self.base_url or "")

    def _key(self) -> str:
        if self.api_key:
            return self.api_key
        if self.compatible:
            return (os.environ.get(KEY_ENV) if self._bound() else None) or _NO_KEY
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise MissingKeyError(f"no OpenAI API key for {self.model!r}: set OPENAI_API_KEY "
                                  "(https://platform.openai.com/api-keys)")
        return key

    def _new_client(self) -> sdk.AsyncOpenAI:
        kw: dict[str, Any] = {"api_key": self._key(), **self._client_options(sdk)}
        if self.base_url:
            kw["base_url"] = self.base_url
        if not self._bound():
            kw["default_headers"] = _unbound_headers()
        return sdk.AsyncOpenAI(**kw)

    # ------------------------------------------------------------ request

    def build_body(self, request: Request) -> dict[str, Any]:
        """The Chat Completions body for `request` (public so tests can inspect it)."""
        if request.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {request.max_tokens}")
        messages: list[dict[str, Any]] = []
        system = "\n\n".join(s for s in (request.system, request.context) if s)
        if system:
            messages.append({"role": "system", "content": system})
        messages += [_message(t, i) for i, t in enumerate(request.messages)]
        if request.prefill:
            if messages and messages[-1]["role"] == "assistant":
                raise ValueError("a request cannot end with an assistant turn and also carry a prefill")
            messages.append({"role": "assistant", "content": request.prefill})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        # OpenAI's reasoning models refuse max_tokens; compatible servers know only max_tokens.
        body["max_tokens" if self.compatible else "max_completion_tokens"] = request.max_tokens
        if request.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}} for t in request.tools]
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    # ------------------------------------------------------------ stream

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        """Text deltas (not repeating the prefill), tool calls, usage if the server sends it, `Done`."""
        body = self.build_body(request)
        client = self._client()

        stream = await self._open(lambda: client.chat.completions.create(**body))
        usage: Usage | None = None
        finish: str | None = None
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments text]
        chunks = 0
        try:
            async with stream:
                async for chunk in stream:
                    chunks += 1
                    if chunk.usage is not None:
                        usage = _usage(chunk.usage)
                    for choice in chunk.choices or ():
                        if choice.index != 0:
                            continue
                        d = choice.delta
                        if d is not None and d.content:
                            yield TextDelta(d.content)
                        for tc in (d.tool_calls or ()) if d is not None else ():
                            slot = calls.setdefault(tc.index, ["", "", ""])
                            if tc.id:
                                slot[0] = tc.id
                            if tc.function is not None:
                                if tc.function.name:
                                    slot[1] += tc.function.name
                                if tc.function.arguments:
                                    slot[2] += tc.function.arguments
                        if choice.finish_reason:
                            finish = choice.finish_reason
        except ProviderError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(e, streaming=True) from e
        if finish is None and chunks == 0:
            # llama_cpp.server answers 200 and then fails inside its generator, e.g. on a prompt
            # longer than its context window: the body ends empty and the reason is in its log.
            raise ProviderNetworkError(
                f"{self._where()} ended the stream without sending anything: the server failed on this "
                "request (a llama.cpp server does this when the prompt exceeds its context window); "
                "see the server's log")
        if finish is None:
            raise ProviderNetworkError(f"{self.model}: the stream ended before the answer was complete "
                                       "(no finish_reason); the connection was probably cut")
        for i in sorted(calls):
            cid, name, raw = calls[i]
            yield tool_call_from_json(cid or f"call_{i}", name, raw)
        if usage is not None:
            yield usage
        yield Done("tool_use" if calls and finish == "stop" else _STOP.get(finish, finish))

    # ------------------------------------------------------------ errors

    def _where(self) -> str:
        return self.base_url or "the OpenAI API"

    def _error(self, e: BaseException, streaming: bool = False) -> ProviderError:
        """Translate an SDK or transport error into one the user can act on. `streaming`: the
        stream had opened, so a connection error means it broke mid-answer."""
        if (low := self._transport_error(e, streaming)) is not None:
            return low
        if isinstance(e, sdk.APIError):
            status = getattr(e, "status_code", None)
            code, msg = _error_fields(e)
            low = (msg + " " + code).lower()
            headers = getattr(getattr(e, "response", None), "headers", None)
            if status == 429 and code != "insufficient_quota":
                err: ProviderError = RateLimitError(f"{self.model}: rate limited by {self._where()}: "
                                                    f"{msg}{asked_wait(e)}")
                err.retry_after = parse_retry_after(headers)  # type: ignore[attr-defined]
                return err
            if status == 429:
                return ProviderError(f"{self.model}: quota exceeded at {self._where()} (check billing): {msg}")
            if status is not None and status >= 500:
                err = OverloadedError(f"{self.model}: {self._where()} is overloaded or failing ({status}): "
                                      f"{msg}{asked_wait(e)}")
                err.retry_after = parse_retry_after(headers)  # type: ignore[attr-defined]
                return err
            if status == 401:
                if self.compatible and not self._bound():
                    return MissingKeyError(
                        f"{self._where()} wants an API key, and {KEY_ENV} is sent only to the base "
                        f"URLs in {BASE_URL_ENV}: add {self._where()} there to send it: {msg}")
                env = KEY_ENV if self.compatible else "OPENAI_API_KEY"
                return MissingKeyError(f"{self._where()} rejected the API key (check {env}): {msg}")
            if status == 404 and ("model" in low or code == "model_not_found"):
                return UnknownModelError(f"{self._where()} does not serve the model {self.model!r}: {msg}")
            if status == 404:
                return ProviderError(f"{self._where()} answered 404 (is the base URL right? it usually "
                                     f"ends in /v1): {msg}")
            if any(p in low for p in _CONTEXT_PHRASES) or "exceed context window" in low:
                return ContextTooLongError(f"{self.model}: the prompt is too long for the model: {msg}")
            return ProviderError(f"{self.model}: API error {status or ''} from {self._where()}: {msg}")
        return ProviderError(f"{self.model}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- helpers

def _error_fields(e: BaseException) -> tuple[str, str]:
    """(error code, message) from an OpenAI-style error body; servers vary, so be lenient."""
    body = error_body(e)
    if body is not None:
        return str(body.get("code") or body.get("type") or ""), str(body.get("message") or e)
    return "", str(getattr(e, "message", None) or e)


def _usage(u: Any) -> Usage:
    details = getattr(u, "prompt_tokens_details", None)
    cached = int(getattr(details, "cached_tokens", None) or 0)
    written = int(getattr(details, "cache_write_tokens", None) or 0)
    prompt = int(u.prompt_tokens or 0)
    return Usage(input=max(0, prompt - cached - written), output=int(u.completion_tokens or 0),
                 cache_read=cached, cache_write=written)


def _message(turn: Turn, index: int) -> dict[str, Any]:
    if turn.role == "tool":
        if not turn.tool_call_id:
            raise ValueError(f"tool turn {index} has no tool_call_id")
        # Chat Completions tool messages carry text only; an image in a tool result is described.
        text = "".join(p.text if p.type == "text" else f"[image {p.mime} omitted]" for p in turn.parts())
        return {"role": "tool", "tool_call_id": turn.tool_call_id, "content": text}
    parts = turn.parts()
    if any(p.type == "image" for p in parts):
        if turn.role != "user":
            raise ValueError(f"turn {index}: images can only be sent in user turns")
        content: Any = []
        for p in parts:
            if p.type == "image":
                if not p.mime.startswith("image/") or not p.data:
                    raise ValueError(f"turn {index}: an image part needs an image/* mime and base64 data")
                content.append({"type": "image_url", "image_url": {"url": f"data:{p.mime};base64,{p.data}"}})
            elif p.text:
                content.append({"type": "text", "text": p.text})
    else:
        content = turn.text()
    msg: dict[str, Any] = {"role": turn.role, "content": content}
    if turn.role == "assistant" and turn.tool_calls:
        msg["content"] = content or None
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                             for c in turn.tool_calls]
    return msg


def _unbound_headers() -> dict[str, Any]:
    """Headers for a server that gets none of the user's credentials: the SDK adds
    OpenAI-Organization / OpenAI-Project from OPENAI_ORG_ID / OPENAI_PROJECT_ID and every line of
    OPENAI_CUSTOM_HEADERS ("Name: value") to each request; `Omit` removes them. An explicit
    Authorization (the placeholder) also makes the SDK drop one given in OPENAI_CUSTOM_HEADERS."""
    headers: dict[str, Any] = {"OpenAI-Organization": sdk.Omit(), "OpenAI-Project": sdk.Omit()}
    for line in os.environ.get("OPENAI_CUSTOM_HEADERS", "").split("\n"):
        name, colon, _ = line.partition(":")
        if colon and name.strip():
            headers[name.strip()] = sdk.Omit()
    headers["Authorization"] = f"Bearer {_NO_KEY}"
    return headers


def _factory(model: str) -> OpenAIProvider:
    return OpenAIProvider(model)


for _prefix in ("gpt-", "o1", "o3", "o4", "chatgpt-", COMPATIBLE):
    register(_prefix, _factory)
