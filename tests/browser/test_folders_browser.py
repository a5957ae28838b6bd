"""Folders in a real browser: make a folder and give it a context note from the dialogue list,
create a dialogue in it from the list's form, put it in concise mode in its settings, and run a
prompt against a dialogue server whose Claude is the local replay server (the official SDK in the
server process). The request Claude got carries the system prompt with the mode's text, then the
folder's note first in the context, before the attached context."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from browserutil import claude_server
from servers import anthropic_events, sse

from dialogue.service import MODES, DialogueService

pytestmark = [pytest.mark.browser]


def test_a_dialogue_in_a_folder_with_a_note_sends_the_note_first(page: Page, tmp_path) -> None:
    with claude_server(tmp_path, "folders.db") as (srv, url, db):
        page.goto(url)
        page.locator("#folders > summary").click()
        page.locator("#new-folder-form input[name=path]").fill("team/docs")
        page.locator("#new-folder-form button[type=submit]").click()
        page.wait_for_url(f"{url}/?folder=team%2Fdocs")

        # the outer folder's note, from its settings form
        page.locator("li[data-folder=team] [data-act=folder-settings]").click()
        form = page.locator("#folder-form")
        form.locator("textarea[name=note]").fill("Team rule: answer in French.")
        form.locator("button[type=submit]").click()
        page.wait_for_url(f"{url}/?folder=team")
        expect(page.locator("li[data-folder=team] .has-note")).to_have_count(1)

        # a new dialogue in the inner folder (the form offers the folder the list shows)
        page.goto(f"{url}/?folder=team%2Fdocs")
        new = page.locator("#new-form")
        expect(new.locator("select[name=folder]")).to_have_value("team/docs")
        new.locator("input[name=name]").fill("question")
        new.locator("button[type=submit]").click()
        page.wait_for_url(f"{url}/d/*")
        did = page.url.rsplit("/", 1)[-1]

        svc = DialogueService(db)  # a second writer on the file, as the CLI would be
        try:
            d = svc.open(did)
            assert svc.folder(d.folder).path == "team/docs"
            svc.update(did, model="claude-sonnet-4-5")
            svc.attach(did, "glossary", "chat = cat")
            p = svc.add(did, "prompt", "What is a chat?")
        finally:
            svc.close()
        page.reload()
        info = page.locator("#folder-info")
        expect(info).to_contain_text("In folder team / docs · 1 folder note sent first")

        # concise mode, chosen in the settings: its text is shown, and saved with the dialogue
        page.locator("#settings > summary").click()
        page.locator("#settings select[name=mode]").select_option("concise")
        page.locator("#settings button", has_text="Save settings").click()
        expect(page.locator("#settings textarea[name=mode_prompt]")).to_have_value(
            MODES["concise"], timeout=10_000)

        srv.push(sse(anthropic_events(["Un chat est un animal."])))
        cell = page.locator(f"#m-{p.id}")
        cell.hover()
        cell.locator("[data-act=run]").click()
        expect(cell).to_contain_text("Un chat est un animal.", timeout=30_000)

        body = srv.last.json
        system = [b["text"] for b in body["system"]]
        assert system[0].endswith("\n\n" + MODES["concise"])
        ctx = system[1]
        assert ctx.startswith('<context folder="team">\nTeam rule: answer in French.\n</context>')
        assert ctx.index("Team rule") < ctx.index("chat = cat")
        assert body["system"][-1]["cache_control"]["type"] == "ephemeral"
        assert all(m["role"] != "system" for m in body["messages"])
