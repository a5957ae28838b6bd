"""Images in notes and prompts (issue 15): checked and stored as nbformat cell attachments, shown
inline, sent to Claude and OpenAI as image blocks (through their SDKs against the local replay
server), refused clearly for a model that cannot see them, kept by an .ipynb round trip, and
added from the CLI."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from dialogue.artifacts import read_notebook, to_ipynb_bytes
from dialogue.context import ContextError, build
from dialogue.document import Dialogue, Kind, Message
from dialogue.images import (MAX_IMAGE_BYTES, ImageError, attachment_name, image_bundle,
                             referenced, sniff, with_images)
from dialogue.render import render_markdown
from dialogue.service import DialogueService
from imagefiles import B64, PNG, png
from servers import ReplayServer, anthropic_events, openai_chunks, sse




@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    s = DialogueService(tmp_path / "img.db")
    yield s
    s.close()


@pytest.fixture
def pic(tmp_path):
    p = tmp_path / "red square.png"
    p.write_bytes(PNG)
    return p


# ---------------------------------------------------------------- checking and naming

def test_images_are_told_by_their_bytes_and_refused_clearly(tmp_path):
    assert sniff(PNG) == "image/png"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff(b"GIF89a....") == "image/gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"<svg xmlns=...") is None
    assert image_bundle(PNG) == {"image/png": B64}
    with pytest.raises(ImageError, match="not an image we can attach .text starting"):
        image_bundle(b"hello, world", what="notes.png")  # a name says nothing: the bytes do
    with pytest.raises(ImageError, match="empty"):
        image_bundle(b"")
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES)
    with pytest.raises(ImageError, match=r"5\.0 MiB, over the 5 MiB"):
        image_bundle(big)
    f = tmp_path / "huge.png"
    f.write_bytes(big)
    with pytest.raises(ImageError, match="huge.png is 5.0 MiB"):
        with_images("", {}, [f])
    with pytest.raises(ImageError, match="no such file"):
        with_images("", {}, [tmp_path / "missing.png"])


def test_names_are_safe_in_markdown_and_unique():
    assert attachment_name("red square.png", "image/png") == "red-square.png"
    assert attachment_name("", "image/jpeg") == "image.jpg"
    assert attachment_name("shot.PNG", "image/gif", {"shot.gif"}) == "shot-2.gif"
    source, atts = with_images("Look:", {"image.png": {"image/png": B64}}, [PNG, ("x.png", PNG)])
    assert list(atts) == ["image.png", "image-2.png", "x.png"]
    assert source == "Look:\n\n![image-2.png](attachment:image-2.png)\n![x.png](attachment:x.png)"
    assert referenced("![](attachment:x.png) and `attachment:my%20pic.png`",
                      {"x.png": 1, "image.png": 2, "my pic.png": 3}) == {"x.png": 1, "my pic.png": 3}


# ---------------------------------------------------------------- storage (service, API)

def test_a_note_and_a_prompt_hold_images_as_notebook_attachments(svc, pic):
    d = svc.create("pics")
    n = svc.add(d.id, "note", "The plot:", images=[pic])
    assert n.attachments == {"red-square.png": {"image/png": B64}}
    assert n.source == "The plot:\n\n![red-square.png](attachment:red-square.png)"
    stored = svc.message(d.id, n.id)  # read back from the SQLite file
    assert stored.attachments == n.attachments
    with pytest.raises(ImageError, match="not in a code message"):
        svc.add(d.id, "code", "x = 1", images=[pic])
    txt = pic.with_name("notes.txt")
    txt.write_text("hello")
    before = len(svc.messages(d.id))
    with pytest.raises(ImageError, match="notes.txt is not an image"):
        svc.add(d.id, "prompt", "what?", images=[pic, txt])
    assert len(svc.messages(d.id)) == before  # nothing added

    # the web editor's way: stored without touching the source, the reference goes at the cursor
    m, names = svc.add_images(d.id, n.id, [("screenshot.png", PNG)], base_version=n.version,
                              reference=False)
    assert names == ["screenshot.png"] and m.source == n.source and m.version == n.version + 1
    # an edit that no longer shows an image drops it (the history keeps it)
    m = svc.edit(d.id, n.id, base_version=m.version, prune_attachments=True,
                 source="Only ![](attachment:screenshot.png) now")
    assert list(m.attachments) == ["screenshot.png"]
    assert any("red-square.png" in v.state.get("attachments", {}) for v in svc.history(d.id, n.id))


def test_python_api_asks_with_images(tmp_path, monkeypatch, pic):
    from dialogue import Dialogue as Handle
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    h = Handle.create("api-pics", db=tmp_path / "api.db", model="claude-sonnet-4-5")
    with ReplayServer() as srv:
        srv.push(sse(anthropic_events(["A red square."])))
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        m = h.ask("What is this?", images=[pic])
        blocks = srv.last.json["messages"][-1]["content"]
    assert m.response == "A red square."
    assert {"type": "base64", "media_type": "image/png", "data": B64} in [b.get("source") for b in blocks]
    n = h.add_note("and this one")
    n = h.add_images(n, PNG)
    assert list(n.attachments) == ["image.png"] and n.source.endswith("(attachment:image.png)")


# ---------------------------------------------------------------- shown inline

def test_attachments_render_inline_as_data_urls_and_safely():
    atts = {"a.png": {"image/png": B64}, "notes.txt": {"text/plain": "hi"},
            "big.png": {"image/png": "A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)},
            "evil.png": {"image/png": 'AAAA)" onerror="alert(1)'}}
    html = render_markdown("![a](attachment:a.png) ![](attachment:notes.txt) "
                           "![](attachment:gone.png) ![](attachment:big.png) "
                           "![](attachment:evil.png) `![](attachment:a.png)`", atts)
    assert f'<img src="data:image/png;base64,{B64}" alt="a">' in html
    assert "[image notes.txt: not an image]" in html
    assert "[image gone.png: no such attachment]" in html
    assert "[image big.png: 5.0 MiB, over the 5 MiB shown inline]" in html
    # the value's quote cannot end the attribute: only base64 letters stay, inert
    assert '<img src="data:image/png;base64,AAAAonerror=alert1" alt="">' in html
    assert " onerror=" not in html
    assert "<code>![](attachment:a.png)</code>" in html  # quoted in code: text
    # without the message's attachments, nh3 drops the unknown URL scheme: no broken request
    assert "attachment:" not in render_markdown("![](attachment:a.png)")


# ---------------------------------------------------------------- what the model is sent

def test_context_lists_attached_images_and_refuses_what_no_model_takes():
    d = Dialogue(name="ctx", model="claude-sonnet-4-5", messages=[
        Message(id="n1", kind=Kind.note, source="![](attachment:a.png)",
                attachments={"a.png": {"image/png": B64}}),
        Message(id="c1", kind=Kind.code, source="plot()", outputs=[
            {"output_type": "display_data", "data": {"image/png": B64}, "metadata": {}}]),
        Message(id="p1", kind=Kind.prompt, source="compare", attachments={"b.png": {"image/png": B64}}),
    ])
    req = build(d, "p1")
    assert req.meta["images"] == [{"message": "n1", "name": "a.png", "mime": "image/png"},
                                  {"message": "p1", "name": "b.png", "mime": "image/png"}]
    parts = req.messages[-1].content
    assert [p.type for p in parts].count("image") == 3  # two attached, one code output
    d.messages[0].attachments = {"a.svg": {"image/svg+xml": "<svg/>"}}
    with pytest.raises(ContextError, match="a.svg.*models take PNG, JPEG, GIF or WebP"):
        build(d, "p1")
    d.messages[0].attachments = {"a.png": {"image/png": "AAAA" * (MAX_IMAGE_BYTES // 3 + 2)}}
    with pytest.raises(ContextError, match="5.0 MiB, over the 5.0 MiB a model takes"):
        build(d, "p1")


async def test_a_model_that_cannot_see_images_refuses_before_sending(svc, pic):
    d = svc.create("local-pics", model="local:default")
    svc.add(d.id, "note", "look", images=[pic, pic])
    p = svc.add(d.id, "prompt", "what is it?")
    m = await svc.run(d.id, p.id)
    assert m.meta["error"] == (
        f"model local:default cannot see images; the prompt has 2 images (red-square.png, "
        f"red-square-2.png) in message {svc.messages(d.id)[0].id}. Nothing was sent: choose a "
        "model that can (claude-*, gpt-4o and later; an openai-compatible one listed in "
        "DIALOGUE_VISION_MODELS), or hide those messages or remove the images.")
    assert m.response == ""
    # hidden from the model: nothing to refuse (a code output's image is not counted either)
    note = svc.messages(d.id)[0]
    svc.set_flags(d.id, note.id, hidden=True)
    with ReplayServer() as srv:  # an openai-compatible server: text only unless configured
        d2 = svc.create("compat", model=f"openai-compatible:{srv.openai_base_url}/qwen-vl")
        p2 = svc.add(d2.id, "prompt", "and this?", images=[pic])
        m2 = await svc.run(d2.id, p2.id)
        assert "cannot see images; the prompt has 1 image" in m2.meta["error"]
        assert srv.requests == []  # nothing was sent


async def test_claude_gets_image_blocks_through_the_sdk(svc, pic, monkeypatch):
    d = svc.create("claude-pics", model="claude-sonnet-4-5")
    svc.add(d.id, "note", "A picture:", images=[pic])
    p = svc.add(d.id, "prompt", "And this one?", images=[("blue.png", png(rgb=b"\x00\x00\xff"))])
    with ReplayServer() as srv:
        srv.push(sse(anthropic_events(["Red, then blue."])))
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        m = await svc.run(d.id, p.id)
        content = srv.last.json["messages"][-1]["content"]
    assert m.response == "Red, then blue." and not m.meta.get("error")
    images = [b["source"] for b in content if b["type"] == "image"]
    assert images == [{"type": "base64", "media_type": "image/png", "data": B64},
                      {"type": "base64", "media_type": "image/png",
                       "data": base64.b64encode(png(rgb=b"\x00\x00\xff")).decode()}]
    texts = [b["text"] for b in content if b["type"] == "text"]
    assert texts[0].startswith("A picture:") and texts[-1].startswith("And this one?")


async def test_openai_and_a_configured_compatible_model_get_image_urls(svc, pic, monkeypatch):
    with ReplayServer() as srv:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_base_url)
        for model in ("gpt-4o", f"openai-compatible:{srv.openai_base_url}/qwen2-vl"):
            if model.startswith("openai-compatible:"):
                monkeypatch.setenv("DIALOGUE_VISION_MODELS",
                                   f"claude-x, openai-compatible:{srv.openai_base_url}/*-vl")
            d = svc.create(f"oa-{len(srv.requests)}", model=model)
            p = svc.add(d.id, "prompt", "What colour?", images=[pic])
            srv.push(sse(openai_chunks(["Red."])))
            m = await svc.run(d.id, p.id)
            assert m.response == "Red.", m.meta
            content = srv.last.json["messages"][-1]["content"]
            assert {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{B64}"}} in content
    # OpenAI's text-only models are refused like a local one
    d = svc.create("old", model="gpt-3.5-turbo")
    p = svc.add(d.id, "prompt", "colour?", images=[pic])
    assert "model gpt-3.5-turbo cannot see images" in (await svc.run(d.id, p.id)).meta["error"]


# ---------------------------------------------------------------- notebooks and the CLI

def test_an_ipynb_round_trip_keeps_the_images(svc, pic):
    d = svc.create("nb")
    svc.add(d.id, "note", "Figure 1", images=[pic])
    svc.add(d.id, "prompt", "Explain", images=[("b.png", png(rgb=b"\x00\xff\x00"))])
    raw = to_ipynb_bytes(svc.open(d.id))
    cells = json.loads(raw)["cells"]
    assert cells[0]["cell_type"] == "markdown"
    assert cells[0]["attachments"] == {"red-square.png": {"image/png": B64}}
    back = svc.import_dialogue(read_notebook(raw), name="nb again")
    note, prompt = back.messages
    assert note.attachments == {"red-square.png": {"image/png": B64}}
    assert prompt.kind == Kind.prompt and list(prompt.attachments) == ["b.png"]
    assert f"data:image/png;base64,{B64}" in render_markdown(note.source, note.attachments)


def cli(db, *args):
    return subprocess.run([sys.executable, "-m", "dialogue.cli", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_adds_images_and_refuses_non_images(tmp_path, pic):
    db = tmp_path / "cli.db"
    assert cli(db, "new", "shots").returncode == 0
    r = cli(db, "add", "shots", "--note", "see", "--image", str(pic), "--image", str(pic))
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "report.pdf"
    bad.write_bytes(b"%PDF-1.7 ...")
    r = cli(db, "add", "shots", "--prompt", "and?", "--image", str(bad))
    assert r.returncode != 0
    assert "report.pdf is not an image we can attach" in r.stderr and "Traceback" not in r.stderr
    r = cli(db, "ask", "shots", "what is it?", "--image", str(pic))  # the bundled model: text only
    assert r.returncode != 0 and "cannot see images; the prompt has 3 images" in r.stdout + r.stderr
    r = cli(db, "edit", "shots", "1", "--source", "see below", "--image", str(pic))
    assert r.returncode == 0, r.stderr  # the old images go with their references, the new one in
    shown = cli(db, "show", "shots").stdout
    assert "image red-square.png (image/png, %d bytes)" % len(PNG) in shown
    s = DialogueService(db)
    try:
        note, prompt = s.messages("shots")
        assert list(note.attachments) == ["red-square.png"]
        assert note.source == "see below\n\n![red-square.png](attachment:red-square.png)"
        assert list(prompt.attachments) == ["red-square.png"]
    finally:
        s.close()


def test_edits_of_a_note_with_an_image_store_the_image_once(svc):
    """Every version holds the note's whole state, but a large attachments value goes to the
    content-addressed `blobs` table once: twenty edits do not write twenty copies."""
    big = ("shot.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 400)  # ~100 KB
    d = svc.create("versions")
    n = svc.add(d.id, "note", "v0", images=[big])
    for i in range(20):
        n = svc.edit(d.id, n.id, base_version=n.version, source=f"v{i + 1} ![](attachment:shot.png)")
    con = svc.store.conn  # the store's own connection, read only here
    state_bytes = sum(len(s) for (s,) in con.execute(
        "SELECT state FROM versions WHERE message_id = ?", (n.id,)))
    image_b64 = len(n.attachments["shot.png"]["image/png"])
    assert state_bytes < image_b64 // 4, state_bytes  # 21 versions, not one image copy among them
    (blobs,) = con.execute("SELECT count(*) FROM blobs WHERE data LIKE '{\"shot.png\"%'").fetchone()
    assert blobs == 1
    history = svc.history(d.id, n.id)
    assert len(history) == 21 and all(v.state["attachments"] == n.attachments for v in history)
    restored = svc.restore_version(d.id, n.id, 1, base_version=n.version)
    assert restored.source == "v0\n\n![shot.png](attachment:shot.png)"
    assert restored.attachments == n.attachments


def test_which_models_see_images(svc, monkeypatch):
    from dialogue.llm.catalog import sees_images
    monkeypatch.delenv("DIALOGUE_VISION_MODELS", raising=False)
    assert sees_images("claude-haiku-4-5") and sees_images("gpt-4o") and sees_images("o3")
    assert not sees_images("gpt-3.5-turbo") and not sees_images("gpt-4") and not sees_images("o1-mini")
    assert not sees_images("local:default")
    vl = "openai-compatible:http://gpu:8000/v1#Qwen/Qwen2.5-VL-7B"
    assert not sees_images(vl)  # unknown until the user says so
    monkeypatch.setenv("DIALOGUE_VISION_MODELS", "vllm:*, openai-compatible:http://gpu:8000/v1#*-VL-*")
    assert sees_images(vl) and sees_images("vllm:http://gpu:8000/v1#llava")
    assert not sees_images("local:default")  # a local model never, whatever the list says
    listed = {m.name: m.images for m in svc.models()}
    assert listed["claude-sonnet-4-5"] is True and listed["gpt-5"] is True
    assert listed["local:default"] is False


def test_images_the_text_does_not_place_are_shown_after_it():
    """A notebook may attach images its markdown never refers to; the model is sent them, so the
    page shows them too, after the text and marked as such."""
    atts = {"shown.png": {"image/png": B64}, 'x"><script>.png': {"image/png": B64},
            "notes.txt": {"text/plain": "not an image: not shown"}}
    html = render_markdown("Text with ![](attachment:shown.png)", atts)
    head, _, tail = html.partition('<div class="attachments-unreferenced"')
    assert head.count("<img") == 1 and tail.count("<img") == 1
    assert 'alt="x&quot;&gt;&lt;script&gt;.png"' in tail and "<script>" not in html
    assert "not shown" not in html
    assert render_markdown("plain", {}) == render_markdown("plain")
