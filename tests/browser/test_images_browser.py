"""An image pasted into a prompt in a real browser reaches Claude: Chromium pastes a PNG (a
ClipboardEvent carrying a DataTransfer with a File, as the OS clipboard hands a screenshot to the
page) into the prompt's editor, the page stores it as the prompt's attachment and puts its
reference at the cursor, the prompt is sent, and the local replay server speaking the Messages API
receives the image block through the official SDK in the server process."""
from __future__ import annotations

import base64
import re
import struct
from contextlib import closing

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from imagefiles import noise_png, png
from servers import anthropic_events, sse

from dialogue.images import MAX_IMAGE_BYTES
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


SLOW_UPLOADS = """() => {
  const f = window.fetch;
  window.fetch = (u, o) => String(u).endsWith("/images")
    ? new Promise(r => setTimeout(r, 1500)).then(() => f(u, o)) : f(u, o);
}"""


@pytest.fixture
def claude(tmp_path):
    with claude_server(tmp_path, "pics.db") as c:
        yield c


def test_a_pasted_image_reaches_claude(page: Page, claude) -> None:
    srv, url, db = claude
    with closing(DialogueService(db)) as svc:
        d = svc.create("paste", model="claude-sonnet-4-5")
        p = svc.add(d.id, "prompt", "What is in this picture?")
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
    with closing(DialogueService(db)) as svc:
        msg = svc.message(d.id, p.id)
    assert msg.attachments == {"Screenshot-1.png": {"image/png": b64}}

    # a fast user: paste a second image and send at once, while its upload is still on its way
    # (held back 1.5 s here): the send waits for it, so nothing conflicts and both images go
    page.evaluate(SLOW_UPLOADS)
    cell.locator(".view").dblclick()
    expect(cell).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    page.keyboard.press("Control+End")
    b64b = base64.b64encode(png(2, 2, b"\x00\xff\x00")).decode()
    assert page.evaluate(PASTE, [b64b, "second.png"]) is True
    srv.push(sse(anthropic_events(["Blue, then green."])))
    page.keyboard.press("Control+Enter")
    expect(cell.locator(".answer.markdown")).to_contain_text("Blue, then green.", timeout=WAIT)
    images = [b["source"]["data"] for b in srv.last.json["messages"][-1]["content"]
              if b["type"] == "image"]
    assert images == [b64, b64b]
    assert cell.locator(".conflict").count() == 0
    assert page.watch.errors == [], page.watch.errors


def test_add_image_button_and_refusals(page: Page, claude) -> None:
    srv, url, db = claude
    with closing(DialogueService(db)) as svc:
        d = svc.create("picker", model="claude-sonnet-4-5")
        n = svc.add(d.id, "note", "Figure:")
        c = svc.add(d.id, "code", "x = 1")
    page.goto(f"{url}/d/{d.id}")
    note = page.locator(f"#m-{n.id}")
    note.locator(".view").dblclick()
    expect(note).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    pick = note.locator('input[data-act="image-file"]')
    # "Add image…" with a file that only calls itself a PNG: refused, nothing inserted
    pick.set_input_files(files=[{"name": "fake.png", "mimeType": "image/png",
                                 "buffer": b"GIF? no: just text"}])
    expect(page.locator("#toast")).to_contain_text("fake.png is not an image we can attach",
                                                   timeout=WAIT)
    expect(note.locator(".CodeMirror")).not_to_contain_text("attachment:")
    pick.set_input_files(files=[{"name": "fig 1.png", "mimeType": "image/png", "buffer": png()}])
    expect(note.locator(".CodeMirror")).to_contain_text("![fig-1.png](attachment:fig-1.png)",
                                                        timeout=WAIT)
    page.keyboard.press("Escape")  # saves; the note shows its image
    expect(note.locator(".view img")).to_have_count(1, timeout=WAIT)
    # a paste of an image into a code cell says where images go, and changes nothing
    code = page.locator(f"#m-{c.id}")
    code.locator(".view").click()
    expect(code).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    assert page.evaluate(PASTE, [base64.b64encode(png()).decode(), "x.png"]) is False
    expect(page.locator("#toast")).to_contain_text("Images go in notes and prompts", timeout=WAIT)
    with closing(DialogueService(db)) as svc:
        assert list(svc.message(d.id, n.id).attachments) == ["fig-1.png"]
        assert svc.message(d.id, c.id).attachments == {}
    assert srv.requests == []
    # the refused upload's 400 is the browser's one console line; nothing else went wrong
    assert page.watch.errors == ["console error: Failed to load resource: the server responded "
                                 "with a status of 400 (Bad Request)"], page.watch.errors


def test_a_screenshot_over_the_limit_is_scaled_down_in_the_browser(page: Page, server) -> None:
    with closing(DialogueService(server.db)) as svc:
        d = svc.create("big screenshot")
        n = svc.add(d.id, "note", "")
    w, h = 1500, 1300  # noise: incompressible, so its PNG is ~5.6 MiB, over the 5 MiB limit
    big = noise_png(w, h)
    assert len(big) > MAX_IMAGE_BYTES
    page.goto(f"{server.url}/d/{d.id}")
    note = page.locator(f"#m-{n.id}")
    note.locator(".view").click()
    expect(note).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    assert page.evaluate(PASTE, [base64.b64encode(big).decode(), "retina.png"]) is True
    expect(page.locator("#toast")).to_contain_text(f"retina.png scaled from {w}×{h} to",
                                                   timeout=WAIT)
    with closing(DialogueService(server.db)) as svc:
        stored = svc.message(d.id, n.id).attachments["retina.png"]["image/png"]
    raw = base64.b64decode(stored)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) <= MAX_IMAGE_BYTES
    sw, sh = struct.unpack(">II", raw[16:24])  # IHDR: the stored image's own size
    assert sw < w and sh < h and abs(sw / sh - w / h) < 0.01  # smaller, same shape
    assert page.watch.errors == [], page.watch.errors


DROP = """([b64, name, selector]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: "image/png" }));
  const el = document.querySelector(selector);
  const over = new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true });
  el.dispatchEvent(over);
  const drop = new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
  el.dispatchEvent(drop);
  return [over.defaultPrevented, drop.defaultPrevented];
}"""


def test_an_image_dropped_on_a_prompt_opens_its_editor_with_the_image(page: Page, server) -> None:
    with closing(DialogueService(server.db)) as svc:
        d = svc.create("drop")
        p = svc.add(d.id, "prompt", "Compare these:")
        c = svc.add(d.id, "code", "1 + 1")
    page.goto(f"{server.url}/d/{d.id}")
    cell = page.locator(f"#m-{p.id}")
    b64 = base64.b64encode(png(5, 5)).decode()
    # dropped on the rendered prompt, not in an editor: it opens one, the image goes in
    assert page.evaluate(DROP, [b64, "chart.png", f"#m-{p.id} .view"]) == [True, True]
    expect(cell).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    expect(cell.locator(".CodeMirror")).to_contain_text("![chart.png](attachment:chart.png)",
                                                        timeout=WAIT)
    page.keyboard.press("Escape")
    expect(cell.locator(".view img")).to_have_attribute("src", f"data:image/png;base64,{b64}",
                                                        timeout=WAIT)
    with closing(DialogueService(server.db)) as svc:
        m = svc.message(d.id, p.id)
    assert m.source == "Compare these:\n![chart.png](attachment:chart.png)\n"
    assert list(m.attachments) == ["chart.png"]
    # on a code cell: refused with a word on where images go, and the page stays (the browser
    # would otherwise leave it to show the file)
    assert page.evaluate(DROP, [b64, "chart.png", f"#m-{c.id} .view"]) == [True, True]
    expect(page.locator("#toast")).to_contain_text("Images go in notes and prompts", timeout=WAIT)
    assert page.url.endswith(f"/d/{d.id}")
    with closing(DialogueService(server.db)) as svc:
        assert svc.message(d.id, c.id).attachments == {}
    assert page.watch.errors == [], page.watch.errors


def test_text_copied_with_a_picture_of_it_pastes_as_text(page: Page, server) -> None:
    """Word, Excel and many editors put a selection on the clipboard as text and as an image:
    that is a text paste, not an image."""
    with closing(DialogueService(server.db)) as svc:
        d = svc.create("word paste")
        n = svc.add(d.id, "note", "")
    page.goto(f"{server.url}/d/{d.id}")
    note = page.locator(f"#m-{n.id}")
    note.locator(".view").click()
    expect(note).to_have_class(re.compile(r"\bediting\b"), timeout=WAIT)
    page.evaluate("""(b64) => {
      const dt = new DataTransfer();
      dt.setData("text/plain", "Revenue grew 12%");
      dt.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], "image.png",
                            { type: "image/png" }));
      const ev = new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true });
      document.activeElement.dispatchEvent(ev);
    }""", base64.b64encode(png()).decode())
    expect(note.locator(".CodeMirror")).to_contain_text("Revenue grew 12%", timeout=WAIT)
    page.keyboard.press("Escape")
    expect(note.locator(".view")).to_contain_text("Revenue grew 12%", timeout=WAIT)
    with closing(DialogueService(server.db)) as svc:
        assert svc.message(d.id, n.id).attachments == {}
    assert not any(u.endswith("/images") for u in page.watch.requests)
    assert page.watch.errors == [], page.watch.errors
