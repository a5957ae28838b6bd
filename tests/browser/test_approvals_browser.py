"""Approving the model's tool calls in a real browser: a dialogue server whose Claude is the local
replay server (official SDK in the server process) scripting tool_use replies that call a kernel
&`fn` tool. The answer pauses at the call and shows it with Allow once / Always allow / Deny; the
pause survives a reload; Deny makes the model go on with "denied by the user"; Always allow runs
the call and later calls of that tool, in this answer and the next, do not ask."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from servers import ReplayServer, anthropic_events, sse

from dialogue.service import DialogueService
from test_approvals import BUMP  # the &`bump` tool these tests call

pytestmark = [pytest.mark.browser]


def call(tid: str, n: int, text: str = "") -> object:
    return sse(anthropic_events([text] if text else [], tool_uses=[(tid, "bump", {"n": n})]))


def said(text: str) -> object:
    return sse(anthropic_events([text]))


def result_sent(srv: ReplayServer, i: int) -> str:
    block = next(b for b in srv.requests[i].json["messages"][-1]["content"]
                 if b["type"] == "tool_result")
    return "".join(p["text"] for p in block["content"])


def run(cell) -> None:
    """Run a cell from the toolbar, which comes to the cell under the mouse."""
    cell.hover()
    cell.locator("[data-act=run]").click()


@pytest.fixture
def claude(tmp_path):
    with claude_server(tmp_path, "tools.db") as got:
        yield got


def test_approve_deny_and_always_allow_a_kernel_tool(page: Page, claude) -> None:
    srv, url, db = claude
    svc = DialogueService(db)
    try:
        d = svc.create("agent", model="claude-sonnet-4-5")
        code = svc.add(d.id, "code", BUMP)
        p1 = svc.add(d.id, "prompt", "Bump the counter by 2 with &`bump`.")
        p2 = svc.add(d.id, "prompt", "Now bump it by 3, then by 4.")
        p3 = svc.add(d.id, "prompt", "And by 1.")
    finally:
        svc.close()

    page.goto(f"{url}/d/{d.id}")
    c = page.locator(f"#m-{code.id}")
    run(c)
    expect(c.locator(".kind-tag")).to_have_text("[1]", timeout=60_000)

    # 1. the answer pauses at the call and shows it; a reload shows it again; Deny
    srv.push(call("toolu_1", 2, "Let me bump it."), said("Understood, I left it alone."))
    a1 = page.locator(f"#m-{p1.id}")
    run(a1)
    box = a1.locator(".approval")
    expect(box).to_have_count(1, timeout=30_000)
    expect(box).to_contain_text("bump")
    expect(box.locator(".tool-args")).to_contain_text('"n": 2')
    page.reload()
    box = page.locator(f"#m-{p1.id} .approval")
    expect(box).to_have_count(1, timeout=30_000)  # still waiting, after a reload
    expect(box.locator("[data-act=approve-always]")).to_have_text(
        "Always allow this tool in this dialogue")
    box.locator("[data-act=approve-deny]").click()
    a1 = page.locator(f"#m-{p1.id}")
    expect(a1.locator(".answer.markdown")).to_contain_text("Understood, I left it alone.",
                                                           timeout=30_000)
    expect(a1.locator(".approval")).to_have_count(0)
    expect(a1.locator(".tool-call .tool-chip")).to_have_text("denied")
    expect(a1.locator(".tool-call")).not_to_have_attribute("open", "")  # folded
    assert result_sent(srv, 1) == "denied by the user"

    # 2. Always allow: this call runs, and the next call of bump in the same answer does not ask
    srv.push(call("toolu_2", 3), call("toolu_3", 4), said("The counter is at 7."))
    a2 = page.locator(f"#m-{p2.id}")
    run(a2)
    box = a2.locator(".approval")
    expect(box).to_have_count(1, timeout=30_000)
    expect(box).to_contain_text('"n": 3')
    box.locator("[data-act=approve-always]").click()
    expect(a2.locator(".answer.markdown")).to_contain_text("The counter is at 7.", timeout=30_000)
    assert result_sent(srv, 3) == "3"
    assert result_sent(srv, 4) == "7"
    expect(a2.locator(".tool-call")).to_have_count(2)
    a2.locator(".tool-call summary").nth(1).click()  # unfold: what went back to the model
    expect(a2.locator(".tool-call").nth(1).locator(".tool-result")).to_have_text("7")

    # 3. a later answer does not ask either
    srv.push(call("toolu_4", 1), said("8 now."))
    a3 = page.locator(f"#m-{p3.id}")
    run(a3)
    expect(a3.locator(".answer.markdown")).to_contain_text("8 now.", timeout=30_000)
    expect(a3.locator(".approval")).to_have_count(0)
    assert result_sent(srv, 6) == "8"

    svc = DialogueService(db)
    try:
        assert svc.open(d.id, messages=False).meta["approvals"]["always"] == ["bump"]
        stored = svc.message(d.id, p1.id).tool_calls
        assert stored[0]["result"] == "denied by the user" and stored[0]["error"]
    finally:
        svc.close()
