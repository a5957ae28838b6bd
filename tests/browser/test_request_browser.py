"""What was sent, in a real browser: a prompt's editor shows what it would send and how much is
cached (fetched when the editor opens and when typing pauses), and after Claude (the local replay
server, through the official SDK in the server process) answers, the answer's "Request" toggle
opens the exact request: its parts with token counts and flags, every text escaped."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from servers import anthropic_events, sse

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]


@pytest.fixture
def claude(tmp_path):
    with claude_server(tmp_path, "rq.db") as got:
        yield got


def test_estimate_then_the_request_panel_after_claude_answers(page: Page, claude) -> None:
    srv, url, db = claude
    svc = DialogueService(db)
    try:
        d = svc.create("sent", model="claude-sonnet-4-5", system="Be exact.")
        svc.add(d.id, "note", "A note with <b>markup</b> & <script>alert(1)</script> in it.")
        h = svc.add(d.id, "note", "the secret plan")
        svc.set_flags(d.id, h.id, hidden=True)
        p = svc.add(d.id, "prompt", "What is in the note?")
    finally:
        svc.close()

    page.goto(f"{url}/d/{d.id}")
    cell = page.locator(f"#m-{p.id}")
    cell.locator(".view").dblclick()
    expect(cell).to_have_class(re.compile(r"\bediting\b"))
    est = cell.locator(".estimate")
    # the editor opened: the estimate arrives without typing
    expect(est).to_contain_text("tokens to send", timeout=10_000)
    expect(est).to_contain_text("no earlier answer in this dialogue wrote Claude's prompt cache")
    before = int(re.search(r"~([\d,]+) tokens", est.inner_text()).group(1).replace(",", ""))
    # typing: one estimate after the pause, for the text being typed (not yet saved)
    page.keyboard.press("Control+End")
    page.keyboard.type(" Explain every word of it in detail, please, with examples." * 3)
    expect(est).not_to_contain_text(f"~{before:,} tokens", timeout=10_000)
    after = int(re.search(r"~([\d,]+) tokens", est.inner_text()).group(1).replace(",", ""))
    assert after > before + 30
    estimates = [u for u in page.watch.requests if u.endswith("/estimate")]
    assert len(estimates) <= 4  # debounced: not one per key (the text above is 180 keys)

    srv.push(sse(anthropic_events(["It has ", "markup."], usage={"cache_creation_input_tokens": 60})))
    page.keyboard.press("Control+Enter")  # send in place
    expect(cell.locator(".answer.markdown")).to_contain_text("It has markup.", timeout=30_000)

    toggle = cell.locator("details.request-toggle")
    toggle.locator("summary").click()
    panel = toggle.locator(".rq-panel")
    expect(panel).to_contain_text("claude-sonnet-4-5")
    expect(panel).to_contain_text("max_tokens 1,024")
    expect(panel.locator(".rq-parts")).to_contain_text("system prompt")
    expect(panel.locator(".rq-parts")).to_contain_text("turn 1: user")
    expect(panel.locator(".rq-parts")).to_contain_text("cache breakpoint")
    hidden = panel.locator(f".rq-messages tr:has-text('{h.id}')")
    expect(hidden).to_contain_text("hidden")
    expect(hidden).to_contain_text("hidden from the model by the user")
    # the turn's text as the model saw it, escaped: the note's tags are text, not elements
    panel.locator(".rq-parts tr:has-text('turn 1') summary").click()
    turn = panel.locator(".rq-parts tr:has-text('turn 1') pre.rq-text")
    expect(turn).to_contain_text("<b>markup</b> & <script>alert(1)</script>")
    expect(turn).to_contain_text("Explain every word")
    assert panel.locator("b, script").count() == 0
    assert "the secret plan" not in panel.inner_text()
    # what the API received is what the panel shows
    sent_text = srv.last.json["messages"][0]["content"][0]["text"]
    assert turn.inner_text() == sent_text

    # the next prompt's estimate counts the prefix the answer wrote to Claude's cache
    page.keyboard.press("Escape")
    svc = DialogueService(db)
    try:
        q = svc.add(d.id, "prompt", "And then?")
    finally:
        svc.close()
    page.reload()
    nxt = page.locator(f"#m-{q.id}")
    nxt.locator(".view").dblclick()
    expect(nxt.locator(".estimate")).to_contain_text("cached (Claude's prompt cache, written by "
                                                     "the last answer", timeout=10_000)
    assert not page.watch.errors, page.watch.errors
    assert not page.watch.outside(url), page.watch.outside(url)
