"""The provider protocol: a provider-neutral request in, an async stream of events out.

`context.build` makes a `Request`; a `Provider` (Anthropic, OpenAI or compatible, local llama.cpp)
turns it into `Event`s. Providers never see the store; surfaces never see an SDK.
"""
from __future__ import annotations

import json
import datetime
import threading
import email.utils
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Mapping, Protocol, runtime_checkable

__all__ = [
    "Part", "Turn", "ToolSpec", "ToolCallReq", "Request",
    "TextDelta", "ToolCall", "Usage", "Done", "Event",
    "Provider", "ProviderError", "MissingKeyError", "UnknownModelError", "ContextTooLongError",
    "ProviderNetworkError", "RateLimitError", "OverloadedError",
    "tool_call_from_json", "register", "get_provider", "resolve", "known_prefixes",
    "ModelInfo", "register_models", "list_models", "check_model",
    "cost", "parse_retry_after",
]


# ---------------------------------------------------------------- request

@dataclass
class Part:
    """A piece of a turn's content: text, or an image (base64 `data` with its `mime`)."""

    type: Literal["text", "image"] = "text"
    text: str = ""
    mime: str = ""
    data: str = ""


@dataclass
class ToolCallReq:
    """A tool call the assistant made in an earlier step (so it can be replayed to the model)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Turn:
    """One turn of the conversation sent to a model.

    role "user" / "assistant" carry `content`; an assistant turn may carry `tool_calls`; a "tool"
    turn carries the result of one call in `content`, with `tool_call_id` and `name`. `cache`
    marks a prompt-cache breakpoint after this turn (Anthropic `cache_control`; others ignore it,
    their caches are automatic prefix caches)."""

    role: Literal["user", "assistant", "tool"]
    content: list[Part] | str = ""
    tool_calls: list[ToolCallReq] = field(default_factory=list)
    tool_call_id: str = ""
    name: str = ""
    cache: bool = False

    def parts(self) -> list[Part]:
        return [Part(text=self.content)] if isinstance(self.content, str) else list(self.content)

    def text(self) -> str:
        return "".join(p.text for p in self.parts() if p.type == "text")


@dataclass
class ToolSpec:
    """A tool offered to the model: a JSON schema for its parameters. `reads_only` marks a tool
    that changes and runs nothing (it may run without asking the user); `source` says where it
    runs ("kernel", "dialogue", "mcp:<server>"), for people, never sent to the model."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    reads_only: bool = False
    source: str = ""


@dataclass
class Request:
    """Everything a provider needs, and nothing about where it came from.

    The stable prefix comes first: `system`, then `context` (the dialogue's attached context,
    kept separate so a provider can put a cache breakpoint right after it), then `messages`.
    `prefill` is the start of the answer the model must continue. `dropped` says how many
    messages the context builder left out to fit the token budget."""

    model: str
    messages: list[Turn] = field(default_factory=list)
    system: str = ""
    context: str = ""
    tools: list[ToolSpec] = field(default_factory=list)
    prefill: str = ""
    max_tokens: int = 1024
    temperature: float | None = None
    stop: list[str] = field(default_factory=list)
    dropped: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- events

@dataclass
class TextDelta:
    text: str
    type: Literal["text"] = "text"


@dataclass
class Progress:
    """How far a model has read a long prompt before it can answer (local models evaluate the
    prompt in chunks and report after each). `read` of `total` prompt tokens are in the model's
    memory (restored ones included); `eta_s` estimates the seconds left, None before any rate is
    known. Surfaces show it so a user never waits blind; consumers that do not care skip it."""

    read: int
    total: int
    eta_s: float | None = None
    # another wait before the answer, in percent (read of total 100): "loading the model X"
    task: str = ""
    type: Literal["progress"] = "progress"

    def describe(self) -> str:
        """The words every surface shows ("reading the prompt: 1,024 / 5,354 tokens · about
        40 s left", "loading the model smollm2: 45%"), so the web cell and the terminal say the
        same thing."""
        if self.task:
            return f"{self.task}: {round(100 * self.read / max(1, self.total))}%"
        text = f"reading the prompt: {self.read:,} / {self.total:,} tokens"
        if self.eta_s is None or self.read >= self.total:
            return text
        s = max(0.0, float(self.eta_s))
        left = ("a few seconds" if s < 5 else f"about {round(s)} s" if s < 90
                else f"about {round(s / 60)} min")
        return f"{text} · {left} left"


@dataclass
class ToolCall:
    """A tool call the model made. `error` is non-empty when the model's arguments could not be
    used (not a JSON object); `arguments` is then {} and the error quotes what the model sent, so
    the tool loop can hand it back to the model as the tool's result instead of failing the answer."""

    id: str
    name: str
    arguments: dict[str, Any]
    type: Literal["tool_call"] = "tool_call"
    error: str = ""


@dataclass
class Usage:
    """Token counts for one model call. Cache fields are zero where a provider has no cache."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    type: Literal["usage"] = "usage"

    def __add__(self, o: "Usage") -> "Usage":
        return Usage(self.input + o.input, self.output + o.output,
                     self.cache_read + o.cache_read, self.cache_write + o.cache_write)

    def counts(self) -> dict[str, int]:
        """The four counts as a message's stored `usage` holds them (beside model, stop_reason,
        cost)."""
        return {"input": self.input, "output": self.output, "cache_read": self.cache_read,
                "cache_write": self.cache_write}


@dataclass
class Done:
    """The last event of a stream. stop_reason: end | max_tokens | stop | tool_use | cancelled |
    refusal (the provider's safety stop: Anthropic `refusal`, OpenAI `content_filter`) |
    max_steps (the tool loop's step limit was reached) | repetition (a local model's answer
    turned into a loop and was stopped)."""

    stop_reason: str = "end"
    type: Literal["done"] = "done"


Event = TextDelta | ToolCall | Usage | Done | Progress


@runtime_checkable
class Provider(Protocol):
    """Streams a request. Closing the iterator (``aclose``) or cancelling the task that drives it
    must stop generation promptly."""

    name: str

    def stream(self, request: Request) -> AsyncIterator[Event]: ...

    def count_tokens(self, text: str) -> int | None:
        """Tokens in `text` by the model's own tokenizer, or None where none is at hand."""
        ...


def tool_call_from_json(id: str, name: str, raw: str) -> ToolCall:
    """A ToolCall from the arguments a model streamed as JSON text. Arguments that are not a JSON
    object become `ToolCall.error` (quoting what the model sent), so the tool loop can tell the
    model instead of running the tool with nothing."""
    try:
        args = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        return ToolCall(id, name, {}, error=f"the arguments for {name} are not valid JSON ({e}): {raw[:500]}")
    if not isinstance(args, dict):
        return ToolCall(id, name, {}, error=f"the arguments for {name} are not a JSON object: {raw[:500]}")
    return ToolCall(id, name, args)


# ---------------------------------------------------------------- errors
# They live in dialogue.errors, below every package, so that local/ and gguf/ can raise them
# without importing llm/ (which imports local/ for the local provider).
from ..errors import (ContextTooLongError, MissingKeyError, OverloadedError, ProviderError,  # noqa: E402,F401
                      ProviderNetworkError, RateLimitError, UnknownModelError)


def parse_retry_after(headers: Mapping[str, str] | None, *, cap: float = 60.0) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date), or None.
    Capped: a server asking for minutes should surface as an error sooner than that, not hang a
    prompt (the caller gives up after the last attempt)."""
    if not headers:
        return None
    get = headers.get
    try:
        ms = get("retry-after-ms")
        if ms is not None:
            return max(0.0, min(cap, float(ms) / 1000))
    except (TypeError, ValueError):
        pass
    ra = get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, min(cap, float(ra)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, min(cap, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()))


# ---------------------------------------------------------------- registry

# (prefix, factory). A factory gets the full model name and returns a provider.
_REGISTRY: list[tuple[str, Callable[[str], Provider]]] = []


def register(prefix: str, factory: Callable[[str], Provider]) -> None:
    """Map model names starting with `prefix` to a provider factory. Longer prefixes win."""
    _REGISTRY.append((prefix, factory))
    _REGISTRY.sort(key=lambda pf: -len(pf[0]))


def known_prefixes() -> list[str]:
    _load_builtin()
    return [p for p, _ in _REGISTRY]


def resolve(model: str) -> Callable[[str], Provider]:
    _load_builtin(model)
    for prefix, factory in _REGISTRY:
        if model.startswith(prefix):
            return factory
    raise UnknownModelError(
        f"unknown model {model!r}: use claude-*, gpt-*/o1*/o3*/o4*, "
        "openai-compatible:<base_url>/<model>, or local:<name or path.gguf>")


def get_provider(model: str) -> Provider:
    """The provider for a model name (see `resolve`)."""
    return resolve(model)(model)


def check_model(model: str) -> None:
    """Refuse a model name no provider serves (UnknownModelError): an unknown prefix, a malformed
    openai-compatible name, a local model that is not registered or whose file is gone. A missing
    API key is not checked: a key may be set before the dialogue's first prompt."""
    if not isinstance(model, str) or not model.strip():
        raise UnknownModelError("a model name cannot be empty")
    get_provider(model)  # construction checks the name; keys are read on the first request


@dataclass(frozen=True)
class ModelInfo:
    """A model a user can pick, as its provider lists it. `ready`: usable now (its file is
    present, its key is set); `about` says what it is or what is missing. `template` marks a form
    of name to fill in (`openai-compatible:<base_url>/<model>`) rather than one model."""

    name: str
    label: str = ""
    where: str = ""
    about: str = ""
    ready: bool = True
    template: bool = False
    device: str = ""   # where it computes: "CPU", "GPU (all layers)"..., or "" for a remote API
    images: bool = False  # takes images in prompts (catalog.sees_images)


_LISTERS: list[Callable[[], list[ModelInfo]]] = []


def register_models(lister: Callable[[], list[ModelInfo]]) -> None:
    """A provider module's listing of the models it serves (see `list_models`)."""
    if lister not in _LISTERS:
        _LISTERS.append(lister)


def list_models() -> list[ModelInfo]:
    """Every model the providers offer, local ones first: what `dialogue models` prints and the
    web's model picker offers (its `ready` ones)."""
    _load_builtin("local:")
    from . import catalog  # noqa: F401 - registers the hosted models' listings; imports no SDK
    order = {"dialogue.llm.local": 0}
    return [m for f in sorted(_LISTERS, key=lambda f: order.get(f.__module__, 1)) for m in f()]


# The built-in adapters, by the name prefixes each registers. An adapter is imported the first time
# a name with one of its prefixes is resolved (or when every model is listed): importing the
# `anthropic` and `openai` SDKs takes over a second, which a local prompt or a CLI command that
# never calls a hosted model should not pay. Each adapter registers these same prefixes itself
# (a test holds the two in step).
BUILTIN_PREFIXES: dict[str, str] = {
    "claude-": "anthropic",
    "gpt-": "openai", "o1": "openai", "o3": "openai", "o4": "openai", "chatgpt-": "openai",
    "openai-compatible:": "openai",
    "llama-server:": "engines", "vllm:": "engines",
    "local:": "local",
}
_tried: set[str] = set()
# Held while an adapter module is imported: a second thread resolving a model meanwhile (the web
# app resolves in worker threads) waits for the import instead of finding the module marked tried
# but not yet registered, and refusing the model as unknown.
_loading = threading.RLock()


def _builtin_module(model: str) -> str | None:
    """The built-in adapter module (its short name) that serves `model`, by the longest prefix."""
    best = max((p for p in BUILTIN_PREFIXES if model.startswith(p)), key=len, default=None)
    return None if best is None else BUILTIN_PREFIXES[best]


def _load_builtin(model: str | None = None) -> None:
    """Import the built-in adapter that serves `model` (all of them when `model` is None) so it
    registers itself. An adapter whose SDK is not installed is simply not offered."""
    import importlib
    wanted = set(BUILTIN_PREFIXES.values()) if model is None else {_builtin_module(model)} - {None}
    if not wanted - _tried:
        return
    with _loading:
        for mod in sorted(wanted - _tried):
            try:
                importlib.import_module(f"dialogue.llm.{mod}")
            except ImportError:
                pass
            _tried.add(mod)


# ---------------------------------------------------------------- pricing

def cost(model: str, usage: Usage) -> float | None:
    """Cost in US$ of one answer, or None when the price is not known. 0 for local models.

    Prices come from `genai-prices` (Pydantic's maintained price database) rather than a table of
    our own: it matches model names and dated snapshots exactly (no prefix guessing, which priced
    claude-opus-4-5 at the old Opus 4 rate), knows tiered prices (long-context input) and cache
    reads/writes, and is updated with each release. Only its bundled snapshot is read: its
    `UpdatePrices` (which fetches prices from GitHub) is never started, so no network is used.
    A model it does not know, or any openai-compatible server, is None: surfaces say "unknown"
    rather than guess."""
    if model.startswith("local:"):
        return 0.0
    provider_id = _price_provider(model)
    if provider_id is None:
        return None
    try:  # imported here: 0.2 s that only a finished hosted answer pays
        from genai_prices import Usage as PriceUsage, calc_price
    except ImportError:
        return None
    # Our Usage counts fresh input apart from cache reads and writes (see the adapters);
    # genai-prices' input_tokens is the whole prompt, cache reads and writes included.
    priced = PriceUsage(input_tokens=usage.input + usage.cache_read + usage.cache_write,
                        output_tokens=usage.output, cache_read_tokens=usage.cache_read,
                        cache_write_tokens=usage.cache_write)
    try:
        return float(calc_price(priced, model, provider_id=provider_id).total_price)
    except (LookupError, ValueError):  # not in the database, or a price it cannot apply
        return None


def _price_provider(model: str) -> str | None:
    """genai-prices' provider id for a model name: the API that serves it, or None where the
    price is not the API's (an openai-compatible server runs any model, at its own cost)."""
    module = _builtin_module(model)
    return module if module in ("anthropic", "openai") and not model.startswith("openai-compatible:") else None
