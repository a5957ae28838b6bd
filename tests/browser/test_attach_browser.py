"""Issue 15's "done when", in a real browser: attach an installed package's docs and a web page
(a local server) in a dialogue's settings, and see each one's tokens, counted by the bundled
model's tokenizer, and its KV cache state; refresh one. Then, for Claude (the local replay server
in the dialogue server's process): attach both, send a prompt, and find both listed with their
tokens in the answer's Request panel, and their text in what the API received."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from dialogue.service import DialogueService
from pages import PageServer, page as web_page
from servers import anthropic_events, sse

pytestmark = [pytest.mark.browser]

HTML = ("<html><head><title>Walrus facts</title></head><body><nav>MENU</nav><main>"
        "<h1>Walrus facts</h1><p>The walrus weighs up to 1.5 t and lives in the Arctic.</p>"
        "</main></body></html>")


def test_attach_package_docs_and_a_url_and_see_their_tokens(page: Page, server) -> None:
    svc = DialogueService(server.db)
    try:
        did = svc.create("attach in the browser").id  # the bundled local model
    finally:
        svc.close()
    with PageServer({"/walrus.html": web_page("text/html", HTML)}) as pages:
        page.goto(f"{server.url}/d/{did}")
        page.click("#settings > summary")
        _attach(page, pages)

        rows = page.locator("#ctx-status tbody tr")
        expect(rows).to_have_count(2, timeout=60_000)
        for name in ("markdownify", "walrus"):
            row = page.locator("#ctx-status tbody tr", has_text=name)
            # exact counts (no "~"): the local model's own tokenizer
            expect(row.locator(".ctx-tokens")).to_have_text(re.compile(r"^[1-9][\d,]*$"))
            expect(row.locator(".ctx-cached")).to_have_text("not cached")
        docs = int(page.locator("#ctx-status tbody tr", has_text="markdownify")
                   .locator(".ctx-tokens").inner_text().replace(",", ""))
        assert docs > 1000  # README and API docs, not a stub
        expect(page.locator("#ctx-status")).to_contain_text("tokens in all")

        pages.routes["/walrus.html"] = web_page("text/html", HTML.replace("1.5 t", "2 t"))
        page.click("button[aria-label='Refresh walrus']")
        expect(page.locator("#toast")).to_contain_text("Refreshed: walrus changed.")
        assert pages.hits["/walrus.html"] == 2
    # a fresh page counts when the settings are opened, not before
    page.reload()
    expect(page.locator("#ctx-status tbody tr")).to_have_count(0)
    page.click("#settings > summary")
    expect(page.locator("#ctx-status tbody tr")).to_have_count(2)
    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)


def _attach(page: Page, pages: PageServer) -> None:
    """Attach markdownify's docs and the walrus page (named "walrus") in the open settings."""
    page.fill("input[name=package]", "markdownify")
    page.click("button:has-text('Attach source')")
    expect(page.locator("#toast")).to_contain_text("Attached markdownify", timeout=60_000)
    page.fill("input[name=url]", pages.url("/walrus.html"))
    page.fill(".ctx-fetch input[name=name]", "walrus")
    page.click("button:has-text('Attach source')")
    expect(page.locator("#toast")).to_contain_text("Attached walrus")


def test_attached_docs_are_listed_in_the_answers_request_panel(page: Page, tmp_path) -> None:
    with claude_server(tmp_path, "attach-claude.db") as (srv, url, db):
        svc = DialogueService(db)
        try:
            d = svc.create("attach for claude", model="claude-sonnet-4-5")
            p = svc.add(d.id, "prompt", "What does the walrus weigh?")
        finally:
            svc.close()
        with PageServer({"/walrus.html": web_page("text/html", HTML)}) as pages:
            page.goto(f"{url}/d/{d.id}")
            page.click("#settings > summary")
            _attach(page, pages)
        shown: dict[str, int] = {}
        for name in ("markdownify", "walrus"):
            cell = page.locator("#ctx-status tbody tr", has_text=name).locator(".ctx-tokens")
            # Claude's tokenizer is not public: an estimate, marked "~"
            expect(cell).to_have_text(re.compile(r"^~[1-9][\d,]*$"), timeout=60_000)
            shown[name] = int(cell.inner_text()[1:].replace(",", ""))
        assert shown["markdownify"] > 1000

        srv.push(sse(anthropic_events(["Up to 1.5 t."])))
        prompt = page.locator(f"#m-{p.id}")
        prompt.locator(".view").dblclick()
        page.keyboard.press("Control+Enter")  # send
        expect(prompt.locator(".answer.markdown")).to_contain_text("Up to 1.5 t.", timeout=30_000)
        toggle = prompt.locator("details.request-toggle")
        toggle.locator("summary").click()
        parts = toggle.locator(".rq-panel .rq-parts")
        for kind, name in (("package", "markdownify"), ("url", "walrus")):
            row = parts.locator("tr", has_text=f"context: {kind} {name}")
            expect(row).to_have_count(1)
            expect(row.locator("td.num")).to_have_text(f"{shown[name]:,}")
        expect(parts.locator("tr", has_text="context: url walrus")).to_contain_text(
            pages.url("/walrus.html"))
        # what the API received holds both, as the panel says
        system = " ".join(b["text"] for b in srv.last.json["system"])
        assert "The walrus weighs up to 1.5 t" in system and 'name="markdownify"' in system
    assert page.watch.errors == [], page.watch.errors
