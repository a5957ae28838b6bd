"""Adapters in a real browser: choose a set in the picker, lose a race with another tab,
compare two sets side by side with the bundled model answering, keep one answer, adopt a set,
close a trial mid-stream, and Run all.

The adapters are small random GGUF LoRA files for the bundled SmolLM2, registered in the test
server's own registry (its DIALOGUE_HOME) from this process, as `dialogue adapters add` would.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from browserutil import stored

from dialogue.gguf.lora import write_lora
from dialogue.local import adapters as A
from loras import random_factors
from dialogue.service import DialogueService

pytestmark = [pytest.mark.browser]

MODEL_TIMEOUT = 120_000  # ms: the first answer loads the model on a busy 2-core machine


@pytest.fixture(scope="module")
def registered(server) -> Path:
    """`weak` (changes some answers) and `strong` (babbles) in the server's adapter registry."""
    home = server.db.parent / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIALOGUE_HOME", str(home))
        A.add(write_lora(server.db.parent / "weak.gguf", "llama", random_factors(1, 4, std=0.05)), "weak")
        A.add(write_lora(server.db.parent / "strong.gguf", "llama", random_factors(2, 8, std=0.3)), "strong")
    return home


def create(server, name: str, cells: list[tuple[str, str]] = ()) -> str:
    svc = DialogueService(server.db)
    try:
        d = svc.create(name, model="local:default", meta={"max_tokens": 16})
        for kind, src in cells:
            svc.add(d.id, kind, src)
        return d.id
    finally:
        svc.close()


def open_dialogue(page: Page, server, did: str) -> None:
    page.goto(f"{server.url}/d/{did}")
    page.wait_for_load_state("load")


def shot(page: Page, name: str) -> None:
    """For the README: written to DIALOGUE_SCREENSHOTS when it names a folder."""
    if os.environ.get("DIALOGUE_SCREENSHOTS"):
        page.wait_for_timeout(400)  # let Pico's checkbox transition finish
        page.screenshot(path=str(Path(os.environ["DIALOGUE_SCREENSHOTS"]) / name))


def test_adapters_picker_trial_and_run_all(page: Page, server, registered) -> None:
    did = create(server, "adapters demo")
    open_dialogue(page, server, did)
    other = page.context.new_page()  # a second tab on the same dialogue, opened now
    other.goto(page.url)

    # ---- choose a set in the picker: the badges show it without opening anything
    picker = page.locator("#adapters")
    expect(picker.locator(".adapter-none")).to_have_text("no adapters")
    picker.locator("summary").click()
    row = picker.locator(".adapter-row[data-adapter=weak]")
    expect(row).to_contain_text("rank 4")
    box = picker.locator(".adapter-pop").bounding_box()  # opens inside the window, whole
    assert box["x"] >= 0 and box["x"] + box["width"] <= page.viewport_size["width"], box
    row.locator("input[type=checkbox]").check()
    row.locator("input.adapter-scale").fill("1.5")
    shot(page, "adapters.png")
    picker.locator("[data-act=save-adapters]").click()
    expect(page.locator("#toast")).to_contain_text("Adapters: weak ×1.5")
    expect(picker.locator(".adapter-badge[data-adapter=weak]")).to_contain_text("×1.5")
    expect(picker.locator(".adapter-pop")).not_to_be_visible()  # the editor closed
    assert stored(server, did).meta["adapters"] == {"weak": 1.5}

    # ---- the other tab still shows the old version: its save is refused, nothing changes
    other.locator("#adapters summary").click()
    other.locator("#adapters .adapter-row[data-adapter=strong] input[type=checkbox]").check()
    other.locator("#adapters [data-act=save-adapters]").click()
    expect(other.locator("#toast.error")).to_contain_text("changed elsewhere")
    expect(other.locator("#toast a", has_text="Reload")).to_be_visible()
    assert stored(server, did).meta["adapters"] == {"weak": 1.5}
    other.close()

    # ---- compare: A = strong (babbles), B = none (the base writes a <script> tag, as text)
    page.locator("[data-act=compare]").click()
    dialog = page.locator("dialog#compare")
    expect(dialog).to_be_visible()
    a_weak = dialog.locator(".trial-set").nth(0).locator(".adapter-row[data-adapter=weak]")
    expect(a_weak.locator("input[type=checkbox]")).to_be_checked()  # A starts as the dialogue's set
    expect(a_weak.locator("input.adapter-scale")).to_have_value("1.5")
    a_weak.locator("input[type=checkbox]").uncheck()
    dialog.locator(".trial-set").nth(0).locator(
        ".adapter-row[data-adapter=strong] input[type=checkbox]").check()
    expect(dialog.locator(".trial-set").nth(1).locator("input[type=checkbox]:checked")).to_have_count(0)
    dialog.locator("textarea[name=source]").fill("Write a script tag in HTML that shows an alert.")
    dialog.locator("input[name=max_tokens]").fill("40")
    dialog.locator("[data-act=run-trial]").click()
    col_a, col_b = page.locator("#trial-a"), page.locator("#trial-b")
    expect(col_a).to_have_class(re.compile(r"\bdone\b"), timeout=MODEL_TIMEOUT)
    expect(col_b).to_have_class(re.compile(r"\bdone\b"), timeout=MODEL_TIMEOUT)
    a_text, b_text = col_a.locator(".answer").inner_text(), col_b.locator(".answer").inner_text()
    assert a_text and b_text and a_text != b_text
    assert "<script" in b_text  # shown as text...
    assert page.evaluate("document.querySelectorAll('dialog#compare script').length") == 0  # ...never run
    expect(col_a.locator(".usage")).to_contain_text(re.compile(r"\d+ out · [\d.]+ s"))
    shot(page, "compare.png")

    # keep B's answer: exactly one new prompt cell at the end, with that answer
    col_b.locator("[data-act=keep-b]").click()
    expect(page.locator("#cells > .cell")).to_have_count(1)
    expect(col_b.locator(".kept")).to_be_visible()
    last = page.locator("#cells > .cell").nth(0)
    expect(last).to_have_attribute("data-kind", "prompt")
    expect(last.locator(".answer")).to_contain_text("script")
    kept = stored(server, did).messages[-1]
    assert kept.meta == {"adapters": {}, "trial": True} and "<script" in kept.response
    assert page.evaluate("document.querySelectorAll('#cells script').length") == 0

    # adopt A's set for the dialogue
    col_a.locator("[data-act=use-a]").click()
    expect(page.locator("#toast")).to_contain_text("Adapters: strong ×1")
    expect(page.locator("#adapters .adapter-badge[data-adapter=strong]")).to_be_visible()
    assert stored(server, did).meta["adapters"] == {"strong": 1.0}

    # ---- a trial closed mid-stream: its stream closes and the model is free for the next run
    dialog.locator("textarea[name=source]").fill("What is the capital of France?")
    dialog.locator("input[name=max_tokens]").fill("4000")
    dialog.locator("[data-act=run-trial]").click()
    expect(page.locator("#trial-a-text")).not_to_be_empty(timeout=MODEL_TIMEOUT)
    dialog.locator("[data-act=close-modal]").click()
    expect(page.locator("dialog#compare")).to_have_count(0)

    # ---- Run all: both code cells run, top to bottom, with their live updates
    svc = DialogueService(server.db)
    try:
        svc.add(did, "code", "x = 21")
        svc.add(did, "code", "print(x * 2)")
    finally:
        svc.close()
    page.reload()
    page.locator("[data-act=run-all]").click()
    cells = page.locator("#cells > .cell")
    expect(cells.nth(2).locator(".outputs")).to_have_text("42", timeout=60_000)
    expect(cells.nth(1).locator(".kind-tag")).to_have_text("[1]")
    expect(cells.nth(2).locator(".kind-tag")).to_have_text("[2]")
    expect(page.locator("#runall [data-act=run-all]")).to_be_visible()
    expect(page.locator("#toast")).to_contain_text("Ran 2 code cells")

    # the prompt kept from the trial runs under the dialogue's set (strong) and finishes: the
    # closed trial did not leave the model generating its 4,000 tokens
    # (a generous bound for 16 tokens; the cut trial alone would have run for about a minute)
    last.locator(".view").click()
    page.keyboard.press("Control+Enter")
    deadline = time.monotonic() + 30
    while (answer := stored(server, did).messages[0]).version < kept.version + 2:  # begin, finish
        assert time.monotonic() < deadline, "the prompt did not finish: is the model still busy?"
        page.wait_for_timeout(100)
    expect(last.locator(".result.running")).to_have_count(0)
    assert answer.response and not answer.meta.get("error")
    assert answer.usage["stop_reason"] in ("end", "max_tokens") and "estimated" not in answer.usage

    # the dialogue list shows the set
    page.goto(server.url + "/")
    expect(page.locator(f"#row-{did} .adapter-badge[data-adapter=strong]")).to_be_visible()
    assert page.watch.errors == [], page.watch.errors  # (the other tab's 409 was logged there)
    assert page.watch.outside(server.url) == []
