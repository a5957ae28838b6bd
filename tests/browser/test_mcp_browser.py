"""MCP servers in a real browser: the settings panel lists the configured servers without
starting them, a switch turns one on in the dialogue, its tools show when opened; then Claude (the
local replay server, official SDK in the server process) calls one of its tools that changes
things, the answer pauses showing the MCP server and the call, Allow once runs it on the real
server (tests/mcp_server.py, stdio) and the answer finishes with the result."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from servers import anthropic_events, sse

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]

SERVER = str(Path(__file__).parents[1] / "mcp_server.py")


@pytest.fixture
def claude(tmp_path, monkeypatch):
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"calc": {"command": sys.executable,
                                                        "args": [SERVER]}}}))
    monkeypatch.setenv("DIALOGUE_MCP_CONFIG", str(path))  # the server process inherits it
    with claude_server(tmp_path, "mcp.db") as got:
        yield got


def test_switch_on_a_server_see_its_tools_and_approve_its_call(page: Page, claude) -> None:
    srv, url, db = claude
    svc = DialogueService(db)
    try:
        d = svc.create("mcp", model="claude-sonnet-4-5")
        p = svc.add(d.id, "prompt", "Echo <b>hello</b> with the calc server.")
    finally:
        svc.close()

    page.goto(f"{url}/d/{d.id}")
    page.locator("#settings > summary").click()
    section = page.locator("#mcp-settings")
    expect(section).to_contain_text("calc", timeout=20_000)
    switch = section.locator("input[type=checkbox]")
    expect(switch).not_to_be_checked()
    switch.check()
    expect(page.locator("#mcp-settings input[type=checkbox]")).to_be_checked(timeout=20_000)
    expect(page.locator("body")).to_contain_text("MCP server calc on in this dialogue.")
    page.locator("#mcp-settings details summary").click()
    tools = page.locator("#mcp-settings .mcp-tools")
    expect(tools).to_contain_text("calc__add", timeout=30_000)
    expect(tools).to_contain_text("reads only")

    srv.push(sse(anthropic_events(["Calling it."], tool_uses=[
                 ("toolu_1", "calc__echo", {"text": "<b>hello</b>"})])),
             sse(anthropic_events(["It said hello."])))
    cell = page.locator(f"#m-{p.id}")
    cell.hover()
    cell.locator("[data-act=run]").click()
    box = cell.locator(".approval")
    expect(box).to_have_count(1, timeout=30_000)
    expect(box).to_contain_text("MCP server 'calc'")
    expect(box).to_contain_text("<b>hello</b>")  # shown as text, not markup
    expect(box.locator("b")).to_have_count(0)
    box.locator("[data-act=approve-once]").click()
    expect(cell.locator(".answer.markdown")).to_contain_text("It said hello.", timeout=30_000)
    block = next(b for b in srv.requests[1].json["messages"][-1]["content"]
                 if b["type"] == "tool_result")
    assert "".join(x["text"] for x in block["content"]) == "<b>hello</b>"
    assert page.watch.errors == [] and page.watch.outside(url) == []
    svc = DialogueService(db)
    try:
        assert svc.open(d.id, messages=False).meta["mcp"] == {"enabled": ["calc"]}
        call = svc.message(d.id, p.id).tool_calls[0]
        assert call["name"] == "calc__echo" and call["result"] == "<b>hello</b>"
    finally:
        svc.close()
