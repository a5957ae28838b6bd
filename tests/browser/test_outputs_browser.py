"""Outputs and maths in a real browser, as Jupyter shows them (issue 16, "Outputs"): a `\r`
progress bar is one line while it runs and after, a traceback keeps its colours, a long output
scrolls in a box that a click opens, and maths in a note is MathML laid out by the browser while
dollars in prose stay prose. Real server, real kernel, Debian's Chromium."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from browserutil import stored

from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]

PROGRESS = ("import time\n"
            "for i in range(40):\n"
            "    print(f'\\rstep {i:2d} of 40', end='', flush=True)\n"
            "    time.sleep(0.1)\n"
            "print(' done')")


def seed(server, name: str, cells: list[tuple[str, str]]) -> tuple[str, list[str]]:
    svc = DialogueService(server.db)
    try:
        d = svc.create(name)
        return d.id, [svc.add(d.id, kind, src).id for kind, src in cells]
    finally:
        svc.close()


def check_clean(page: Page, server) -> None:
    assert page.watch.errors == [], page.watch.errors
    assert page.watch.outside(server.url) == [], page.watch.outside(server.url)


def run(page: Page, mid: str) -> None:
    page.click(f"#m-{mid} .view")
    page.keyboard.press("Escape")
    page.keyboard.press("Control+Enter")


def test_a_progress_bar_is_one_line_while_it_runs_and_after(page: Page, server) -> None:
    did, (mid,) = seed(server, "progress", [("code", PROGRESS)])
    page.goto(f"{server.url}/d/{did}")
    run(page, mid)
    out = page.locator(f"#o-{mid}")
    seen: list[str] = []
    # the loop below watches while the cell runs: first see it running (on a loaded machine the
    # page may not show that yet when run() returns)
    expect(page.locator(f"#m-{mid} .result.running")).to_have_count(1, timeout=60_000)
    deadline = page.evaluate("Date.now()") + 60_000
    while page.locator(f"#m-{mid} .result.running").count() and page.evaluate("Date.now()") < deadline:
        texts = out.all_inner_texts()  # no waiting: the element goes when the run ends
        if texts and texts[0].strip() and (not seen or seen[-1] != texts[0]):
            seen.append(texts[0])
        page.wait_for_timeout(30)
    live = [t for t in seen if "step" in t]
    assert len(live) >= 3, seen  # the page redrew the line as the cell ran...
    for t in live:  # ...and never showed two steps, or a step per line
        assert t.count("step") == 1 and t.strip().count("\n") == 0, t
    assert len({t for t in live}) >= 3
    result = page.locator(f"#m-{mid} .result pre.output")
    expect(result).to_have_text("step 39 of 40 done\n")
    assert stored(server, did).messages[0].outputs[0]["text"] == "step 39 of 40 done\n"
    check_clean(page, server)


def test_a_traceback_keeps_its_colours(page: Page, server) -> None:
    did, (pid, mid) = seed(server, "colours", [("code", "print('\\x1b[1;32mgreen\\x1b[0m plain')"),
                                               ("code", "def f():\n    return 1/0\nf()")])
    page.goto(f"{server.url}/d/{did}")
    run(page, mid)
    error = page.locator(f"#m-{mid} .result:not(.running) pre.output.error")
    expect(error).to_contain_text("ZeroDivisionError")
    assert "\x1b" not in error.inner_text() and "[0m" not in error.inner_text()
    colours = error.evaluate("""pre => [...pre.querySelectorAll('span[class*="ansi-"]')]
        .map(s => getComputedStyle(s).color)""")
    plain = error.evaluate("pre => getComputedStyle(pre).color")
    assert colours and any(c != plain for c in colours), (colours, plain)
    run(page, pid)
    green = page.locator(f"#m-{pid} .result:not(.running) pre.output.stdout span.ansi-green-intense-fg.ansi-bold")
    expect(green).to_have_text("green")
    assert green.evaluate("s => getComputedStyle(s).color") == "rgb(0, 116, 39)"
    assert green.evaluate("s => getComputedStyle(s).fontWeight") == "700"
    check_clean(page, server)


def test_a_long_output_scrolls_and_opens(page: Page, server) -> None:
    did, (mid,) = seed(server, "long", [("code", "for i in range(300):\n    print('line', i)")])
    page.goto(f"{server.url}/d/{did}")
    run(page, mid)
    box = page.locator(f"#m-{mid} .result:not(.running) .output-long")
    expect(box).to_have_count(1)
    pre = box.locator("pre.output")
    expect(pre).to_contain_text("line 299")
    size = "p => [p.clientHeight, p.scrollHeight]"
    client, full = pre.evaluate(size)
    assert client < full / 3, (client, full)  # a box, scrolled, not 300 lines of page
    toggle = box.locator("summary")
    expect(toggle).to_have_text("Show all 300 lines", use_inner_text=True)
    toggle.click()
    expect(toggle).to_have_text("Scroll it again", use_inner_text=True)
    client, full = pre.evaluate(size)
    assert client >= full - 1, (client, full)
    toggle.click()
    assert pre.evaluate(size)[0] < full / 3
    check_clean(page, server)


def test_maths_in_a_note_is_mathml_and_prose_dollars_stay_prose(page: Page, server) -> None:
    note = ("Let $y = f(x)$ be smooth.\n\n$$\n\\int_0^1 x^2\\,dx = \\frac{1}{3}\n$$\n\n"
            "It costs $5 and $10, and `$z$` is code.")
    did, (mid,) = seed(server, "maths", [("note", note)])
    page.goto(f"{server.url}/d/{did}")
    view = page.locator(f"#m-{mid} .view")
    expect(view.locator("math")).to_have_count(2)
    inline = view.locator(".math.inline math")
    block = view.locator(".math.display math")
    # laid out by the browser's MathML engine: real boxes, the fraction taller than a line
    assert inline.bounding_box()["width"] > 20
    assert block.evaluate("m => m.namespaceURI") == "http://www.w3.org/1998/Math/MathML"
    assert block.locator("mfrac").bounding_box()["height"] > inline.bounding_box()["height"]
    expect(view).to_contain_text("It costs $5 and $10, and")
    expect(view.locator("code")).to_have_text("$z$")
    assert not re.search(r"\$y|\$\$", view.inner_text())
    check_clean(page, server)


def test_the_html_export_shows_maths_colours_and_a_long_output_without_script(page: Page, server) -> None:
    """The exported page (no script allowed by its policy) has the same behaviours: MathML laid
    out, colours, and a long output's box opened by its toggle."""
    from dialogue.artifacts import to_html
    from dialogue.document import Dialogue, Message

    d = Dialogue(name="export", messages=[
        Message(kind="note", source="Let $y = f(x)$ and $$\\sum_{i=1}^n i = \\frac{n(n+1)}{2}$$"),
        Message(kind="code", source="progress()", outputs=[
            {"output_type": "stream", "name": "stderr",
             "text": "\r  0%|\r 50%|#####\r100%|##########| \x1b[32mdone\x1b[0m\n"},
            {"output_type": "stream", "name": "stdout",
             "text": "".join(f"line {i}\n" for i in range(300))}])])
    page.set_content(to_html(d))
    expect(page.locator("math")).to_have_count(2)
    assert page.locator("mfrac").bounding_box()["height"] > 0
    bar = page.locator("pre.output.stderr")
    expect(bar).to_have_text("100%|##########| done\n")
    assert bar.locator("span.ansi-green-fg").evaluate("s => getComputedStyle(s).color") == "rgb(0, 162, 80)"
    pre = page.locator(".output-long pre.output")
    size = "p => [p.clientHeight, p.scrollHeight]"
    client, full = pre.evaluate(size)
    assert client < full / 3
    page.locator(".output-long summary").click()
    client, full = pre.evaluate(size)
    assert client >= full - 1
    assert page.watch.errors == [], page.watch.errors
