"""An image pasted into a prompt in a real browser reaches Claude: Chromium pastes a PNG (a
ClipboardEvent carrying a DataTransfer with a File, as the OS clipboard hands a screenshot to the
page) into the prompt's editor, the page stores it as the prompt's attachment and puts its
reference at the cursor, the prompt is sent, and the local replay server speaking the Messages API
receives the image block through the official SDK in the server process."""
from __future__ import annotations

import base64
import re
import signal
import subprocess

import pytest
from playwright.sync_api import Page, expect

from browserutil import free_port, start_server
from servers import ReplayServer, anthropic_events, sse
from imagefiles import png

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]
WAIT = 30_000  # ms: a busy 2-core machine serves the page and the SDK slowly

PASTE = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "image/png" }));
  const ev = new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true });
  document.activeElement.dispatchEvent(ev);
  return ev.defaultPrevented;
}"""


@pytest.fixture
def claude(tmp_path):
    """A dialogue server whose Claude is the replay server (ANTHROPIC_BASE_URL in its process)."""
    with ReplayServer() as srv:
        port, db = free_port(), tmp_path / "pics.db"
        prelude = (f"import os; os.environ['ANTHROPIC_BASE_URL'] = {srv.base_url!r}; "
                   "os.environ['ANTHROPIC_API_KEY'] = 'sk-ant-test'")
        proc = start_server(tmp_path, db, port, prelude=prelude)
        try:
            yield srv, f"http://127.0.0.1:{port}", db
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_pasted_image_reaches_claude(page: Page, claude) -> None:
    srv, url, db = claude
    svc = DialogueService(db)
    try:
        d = svc.create("paste", model="claude-sonnet-4-5")
        p = svc.add(d.id, "prompt", "What is in this picture?")
    finally:
        svc.close()
    shot = png(4, 3, b"\x10\x80\xf0")
    b64 = base64.b64encode(shot).decode()

    page.goto(f"{url}/d/{d.id}")
    cell = page.locator(f"#m-{p.id}")
    cell.locator(".view").dblclick()
    expect(cell).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    page.keyboard.press("Control+End")
    assert page.evaluate(PASTE, [b64, "Screenshot 1.png"]) is True  # the page took the paste
    expect(page.locator("#toast")).to_contain_text("Added Screenshot-1.png", timeout=WAIT)
    expect(cell.locator(".CodeMirror")).to_contain_text(
        "![Screenshot-1.png](attachment:Screenshot-1.png)", timeout=WAIT)

    srv.push(sse(anthropic_events(["A blue ", "rectangle."])))
    page.keyboard.press("Control+Enter")  # send in place
    expect(cell.locator(".answer.markdown")).to_contain_text("A blue rectangle.", timeout=WAIT)
    # the prompt shows the image inline, from its own attachment
    expect(cell.locator(".view img")).to_have_attribute("src", f"data:image/png;base64,{b64}",
                                                        timeout=WAIT)

    body = srv.last.json
    assert body["model"] == "claude-sonnet-4-5"
    content = body["messages"][-1]["content"]
    assert [b["type"] for b in content][:2] == ["text", "image"]
    assert content[0]["text"].startswith("What is in this picture?")
    assert content[1]["source"] == {"type": "base64", "media_type": "image/png", "data": b64}
    svc = DialogueService(db)
    try:
        msg = svc.message(d.id, p.id)
    finally:
        svc.close()
    assert msg.attachments == {"Screenshot-1.png": {"image/png": b64}}
    assert page.watch.errors == [], page.watch.errors
