"""Hosted models have a context window (llm.catalog.context_window: the user's setting, else the
table of Claude and OpenAI families), so the token budget and the retrieval of docs too large for
the context apply to them as to local models. The whole path runs through the official Anthropic
SDK against the local replay server, whose recorded body is checked."""
from __future__ import annotations

import pytest

from dialogue.llm.base import ProviderError, get_provider
from dialogue.llm.catalog import CONTEXT_ENV, context_window
from dialogue.service import DialogueService
from servers import ReplayServer, anthropic_events, sse
from test_attach import _big_doc

COMPAT = "openai-compatible:http://gpu-box:8000/v1#org/model-7b"


def test_known_models_have_their_documented_windows(monkeypatch):
    monkeypatch.delenv(CONTEXT_ENV, raising=False)
    assert context_window("claude-sonnet-4-5") == context_window("claude-3-haiku-20240307") \
        == 200_000
    assert context_window("claude-2.0") == 100_000
    assert context_window("gpt-5-mini") == 400_000
    assert context_window("gpt-4.1-nano") == 1_047_576
    assert context_window("gpt-4o-mini") == 128_000
    assert context_window("gpt-4-0613") == 8_192 and context_window("gpt-4-32k") == 32_768
    assert context_window("o1-mini") == 128_000 and context_window("o3-mini") == 200_000
    # unknown: no budget (nothing is dropped or cut on a guess)
    assert context_window(COMPAT) is None
    assert context_window("openai-compatible:http://h:1/v1/gpt-4") is None  # a server's, not OpenAI's
    assert get_provider("claude-haiku-4-5").context_window == 200_000
    assert get_provider("gpt-4.1").context_window == 1_047_576
    assert get_provider(COMPAT).context_window is None


def test_the_setting_wins_and_a_bare_number_covers_unknown_models(monkeypatch):
    monkeypatch.setenv(CONTEXT_ENV, "openai-compatible:http://gpu-box:8000/v1#*=32_768, "
                                    "claude-haiku-*=50000 4096")
    assert context_window(COMPAT) == 32_768
    assert get_provider(COMPAT).context_window == 32_768
    assert context_window("claude-haiku-4-5") == 50_000
    assert context_window("claude-sonnet-4-5") == 200_000  # the table beats a bare number
    assert context_window("openai-compatible:http://other:1/v1/m") == 4096
    for bad in ("lots", "claude-*=0", "=100", "claude-*=12k"):
        monkeypatch.setenv(CONTEXT_ENV, bad)
        with pytest.raises(ProviderError, match=CONTEXT_ENV):
            context_window("claude-sonnet-4-5")


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    s = DialogueService(tmp_path / "w.db")
    yield s
    s.close()


async def _ask(svc, srv, name: str, question: str) -> dict:
    p = svc.add(name, "prompt", question)
    srv.push(sse(anthropic_events(["Back off and retry."])))
    mid = svc.start(name, p.id)
    events = [ev async for ev in svc.subscribe(mid)]
    assert events[-1].type == "done", events[-1]
    return {"body": srv.last.json, "entries": svc.sent_request(name, p.id)["context"]["entries"]}


async def test_a_doc_over_a_claude_window_is_sent_as_its_best_chunks(svc, monkeypatch):
    doc = _big_doc()  # ~5,000 tokens by the estimate: six topics
    svc.create("big", model="claude-sonnet-4-5", system="Be brief.")
    svc.attach("big", "sdk docs", doc)
    with ReplayServer() as srv:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        # Claude's own window (200,000) holds it whole
        whole = await _ask(svc, srv, "big", "How do retries and backoff work?")
        text = "\n".join(b["text"] for b in whole["body"]["system"])
        assert "oauth" in text and "[retrieved:" not in text
        assert whole["entries"][0].get("retrieved") is None
        # a configured window of 3,000 tokens: the best chunks, marked, and the request fits
        monkeypatch.setenv(CONTEXT_ENV, "claude-sonnet-*=3000")
        cut = await _ask(svc, srv, "big", "How do retries and backoff work?")
    text = "\n".join(b["text"] for b in cut["body"]["system"])
    docs = cut["entries"][0]
    assert docs["name"] == "sdk docs" and docs["retrieved"] and docs["of"] >= 6
    assert f"of {docs['of']} chunks of 'sdk docs'" in text and "[retrieved: the" in text
    assert "exponential backoff" in text and "oauth" not in text
    assert len(text) < len(doc) / 2
    assert svc.context_status("big")[0]["retrieved"]  # the settings panel says so too
    await svc.shutdown_kernels()
