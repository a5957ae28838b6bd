"""The provider protocol's shared parts: registry, prices, Retry-After, usage arithmetic. Retries
themselves are the SDKs' (tests/test_llm_retries.py)."""
from __future__ import annotations

import email.utils
import subprocess
import sys
import time

import pytest

from dialogue.llm import base
from dialogue.llm.base import (
    UnknownModelError, Usage, cost, get_provider, known_prefixes, parse_retry_after, register, resolve,
)


class _Named:
    def __init__(self, model: str, tag: str) -> None:
        self.name, self.model = tag, model

    async def stream(self, request):  # pragma: no cover - never streamed here
        yield None

    def count_tokens(self, text: str) -> int | None:
        return None


@pytest.fixture
def registry(monkeypatch):
    """An isolated copy of the registry, so test prefixes don't leak into other tests."""
    base._load_builtin()
    monkeypatch.setattr(base, "_REGISTRY", list(base._REGISTRY))
    return base._REGISTRY


# ---------------------------------------------------------------- registry

def test_longest_prefix_wins_whatever_the_registration_order(registry):
    register("zz-long-", lambda m: _Named(m, "long"))
    register("zz-", lambda m: _Named(m, "short"))
    register("zz-long-er-", lambda m: _Named(m, "longer"))
    assert get_provider("zz-long-x").name == "long"
    assert get_provider("zz-long-er-x").name == "longer"
    assert get_provider("zz-other").name == "short"
    assert get_provider("zz-long-x").model == "zz-long-x"  # the factory gets the full name


def test_builtin_names_resolve_to_their_adapters():
    from dialogue.llm.anthropic import AnthropicProvider
    from dialogue.llm.openai import OpenAIProvider

    assert isinstance(get_provider("claude-sonnet-4-6"), AnthropicProvider)
    assert isinstance(get_provider("claude-sonnet-4-6"), base.Provider)
    assert isinstance(get_provider("gpt-4.1"), base.Provider)
    for name in ("gpt-4.1-mini", "o1-preview", "o3", "o4-mini", "chatgpt-4o-latest"):
        p = get_provider(name)
        assert isinstance(p, OpenAIProvider) and p.name == "openai" and p.model == name
    p = get_provider("openai-compatible:http://127.0.0.1:8000/v1/my-model")
    assert isinstance(p, OpenAIProvider) and p.name == "openai-compatible"
    assert (p.base_url, p.model) == ("http://127.0.0.1:8000/v1", "my-model")
    prefixes = known_prefixes()
    assert {"claude-", "gpt-", "o1", "o3", "o4", "chatgpt-", "openai-compatible:"} <= set(prefixes)
    assert [len(p) for p in prefixes] == sorted((len(p) for p in prefixes), reverse=True)


@pytest.mark.parametrize("name", ["mistral-large", "Claude-3", "", "gemini-2.5-pro", "llama3"])
def test_unknown_model_names_say_what_is_accepted(name):
    with pytest.raises(UnknownModelError) as e:
        resolve(name)
    assert repr(name) in str(e.value) and "claude-*" in str(e.value) and "openai-compatible:" in str(e.value)


# ---------------------------------------------------------------- prices

@pytest.mark.parametrize("model, dollars", [
    # 1M input + 1M output tokens at the published prices (the old prefix table said $90, $10
    # and $11.25: claude-opus-4-5 at Opus 4's rate, o3-mini at o3's, gpt-5-nano at gpt-5's)
    ("claude-opus-4-5", 5.0 + 25.0),
    ("o3-mini", 1.1 + 4.4),
    ("gpt-5-nano", 0.05 + 0.4),
    ("gpt-4.1-mini-2025-04-14", 0.4 + 1.6),  # a dated snapshot is priced as its model
])
def test_cost_comes_from_the_price_database(model, dollars):
    assert cost(model, Usage(input=1_000_000, output=1_000_000)) == pytest.approx(dollars)


def test_cost_prices_cache_reads_and_writes():
    # a typical cached Claude answer: 14 fresh, 2,188 read, 52 written, 17 out ($ per MTok:
    # 3 input, 15 output, 0.30 cache read, 3.75 cache write)
    assert cost("claude-sonnet-4-5", Usage(14, 17, 2188, 52)) == pytest.approx(
        (14 * 3 + 17 * 15 + 2188 * 0.3 + 52 * 3.75) / 1e6)
    # OpenAI: cached input at its own rate (gpt-4.1: 2.00 input, 0.50 cached)
    assert cost("gpt-4.1", Usage(input=1_000_000, cache_read=1_000_000)) == pytest.approx(2.5)


def test_cost_is_zero_locally_and_unknown_elsewhere():
    assert cost("local:smollm2", Usage(10_000, 10_000)) == 0.0
    assert cost("openai-compatible:http://h:1/v1/m", Usage(10)) is None
    assert cost("openai-compatible:http://h:1/v1/gpt-4.1", Usage(10)) is None  # not OpenAI's price
    assert cost("claude-unreleased-9", Usage(10)) is None
    assert cost("gpt-99-imaginary", Usage(10)) is None


def test_cost_reads_no_network():
    """The database is the package's bundled snapshot: with every socket refused, prices still
    come out (in a fresh process, so nothing was imported before the sockets were shut)."""
    code = """
import socket
def refuse(*a, **k):
    raise OSError("network used")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
from dialogue.llm.base import Usage, cost
print(cost("claude-opus-4-5", Usage(input=1_000_000, output=1_000_000)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(30.0)


def test_usage_adds_field_by_field():
    total = Usage(1, 2, 3, 4) + Usage(10, 20, 30, 40) + Usage()
    assert (total.input, total.output, total.cache_read, total.cache_write) == (11, 22, 33, 44)
    assert total.type == "usage"


# ---------------------------------------------------------------- retries

def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "3600"}) == 60.0  # capped
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None
    future = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 <= parse_retry_after({"retry-after": future}) <= 20
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
