"""Attaching files, folders, package docs and web pages to a dialogue, through the service, the
CLI and the Python API; refresh; token counts and the local KV cache state per item (the bundled
model, real answers); retrieval of the best chunks of docs too large for the context."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dialogue import Dialogue, NotFoundError, StoreError, context
from dialogue.service import DialogueService
from pages import PageServer, page
from test_service_surface import cli

HTML = ("<html><head><title>Walrus facts</title><script>var x='SCRIPT'</script></head><body>"
        "<nav>MENU</nav><main><h1>Walrus facts</h1><p>The walrus weighs up to <b>1.5 t</b>.</p>"
        "</main></body></html>")


@pytest.fixture
def svc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    s = DialogueService(tmp_path / "d.db")
    yield s
    s.close()


def test_attach_each_kind_of_source_and_refresh(svc: DialogueService, tmp_path: Path) -> None:
    d = svc.create("d", model="claude-sonnet-4-5")
    f = tmp_path / "notes.md"
    f.write_text("walrus: 3 m\n")
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    (proj / "a.py").write_text("print('a')\n")
    (proj / "logo.png").write_bytes(b"\x89PNG\0\0")
    with PageServer({"/w.html": page("text/html", HTML)}) as srv:
        d, loaded = svc.attach_source("d", path=f)
        assert (loaded.kind, loaded.source) == ("file", str(f.resolve()))
        d, loaded = svc.attach_source("d", path=proj, name="project")
        assert dict(loaded.skipped) == {".git/": "not entered", "logo.png": "binary"}
        d, _ = svc.attach_source("d", package="markdownify")
        d, loaded = svc.attach_source("d", url=srv.url("/w.html"), name="walrus page")
        assert [(c.name, c.kind) for c in d.context] == [
            ("notes.md", "file"), ("project", "directory"), ("markdownify", "package"),
            ("walrus page", "url")]
        page_text = d.context[-1].content
        assert page_text.startswith("# Walrus facts") and "SCRIPT" not in page_text
        # nothing is stored when a source cannot be read
        v = d.version
        for bad in ({"path": tmp_path / "missing"}, {"package": "no-such-package-xyz"},
                    {"url": srv.url("/gone")}, {"path": proj / "logo.png"}):
            with pytest.raises(StoreError):
                svc.attach_source("d", **bad)
        with pytest.raises(StoreError, match="one thing"):
            svc.attach_source("d", path=f, url=srv.url("/w.html"))
        assert svc.open("d", messages=False).version == v

        # refresh: the changed sources are read again, in one settings version
        f.write_text("walrus: 3.5 m\n")
        (proj / "b.md").write_text("# B\n")
        srv.routes["/w.html"] = page("text/html", HTML.replace("1.5 t", "2 t"))
        svc.attach("d", "rules", "Answer in French.")
        d, report = svc.refresh("d")
        by = {r["name"]: r for r in report}
        assert by["notes.md"]["changed"] and by["project"]["changed"] and by["walrus page"]["changed"]
        assert by["markdownify"]["changed"] is False
        assert "no source" in by["rules"]["skipped"]
        ctx = {c.name: c.content for c in d.context}
        assert ctx["notes.md"] == "walrus: 3.5 m\n" and "==> b.md <==" in ctx["project"]
        assert "2 t" in ctx["walrus page"] and d.version == v + 2  # the text item, the refresh
        assert srv.hits["/w.html"] == 2
        # one item; a failing one changes nothing and says why
        f.unlink()
        with pytest.raises(StoreError, match="cannot refresh 'notes.md'.*no such file"):
            svc.refresh("d", "notes.md")
        with pytest.raises(NotFoundError, match="no attached item 'nope'"):
            svc.refresh("d", "nope")
        d2, report = svc.refresh("d")
        assert "no such file" in {r["name"]: r for r in report}["notes.md"]["error"]
        assert {c.name: c.content for c in d2.context}["notes.md"] == "walrus: 3.5 m\n"


def test_refresh_skips_by_kind_of_error_not_by_its_words(svc: DialogueService, tmp_path: Path
                                                          ) -> None:
    """An item with nothing to read again is skipped; a file that is gone is an error, even
    where its path holds the words the skip's message uses ("uploaded", "no source")."""
    svc.create("r", model="claude-sonnet-4-5")
    gone = tmp_path / "uploaded" / "no source.md"
    gone.parent.mkdir()
    gone.write_text("kept\n")
    svc.attach_source("r", path=gone)
    svc.attach("r", "pasted", "typed in")
    svc.attach("r", "upload", "sent from a browser", kind="file")  # no path: uploaded
    gone.unlink()
    _, report = svc.refresh("r")
    by = {r["name"]: r for r in report}
    assert "no such file" in by["no source.md"]["error"] and "skipped" not in by["no source.md"]
    assert "no source" in by["pasted"]["skipped"] and "uploaded" in by["upload"]["skipped"]


def test_status_counts_tokens_and_a_hosted_model_has_no_cache_state(svc: DialogueService) -> None:
    svc.create("h", model="claude-sonnet-4-5")
    svc.attach("h", "rules", "x" * 400)
    assert svc.context_status("h") == [{"name": "rules", "kind": "text", "source": "",
                                        "chars": 400, "tokens": 100, "exact": False,
                                        "cached": None, "retrieved": False}]
    assert svc.context_status(svc.create("empty").id) == []


def test_local_model_tokens_and_kv_cache_state_follow_a_real_answer(svc: DialogueService) -> None:
    """The bundled model: exact token counts, 'not cached' until a prompt has read the attached
    docs, 'cached' after (its system message, attached docs included, is saved to the disk KV
    cache), and 'not cached' again when the docs change."""
    import asyncio
    from dialogue.llm.base import get_provider
    d = svc.create("local", model="local:default", system="Answer in one word.")
    svc.update("local", meta={"max_tokens": 3})
    svc.attach("local", "facts", "The walrus is 3 m long. " * 20)
    rows = svc.context_status("local")
    want = get_provider("local:default").count_tokens("The walrus is 3 m long. " * 20)
    assert rows[0]["exact"] and rows[0]["tokens"] == want and rows[0]["cached"] is False
    m = svc.add("local", "prompt", "How long is the walrus?")

    async def answer() -> None:
        await svc.wait(svc.start("local", m.id))
    asyncio.run(answer())
    assert svc.open("local").messages[-1].response
    assert svc.context_status("local")[0]["cached"] is True
    svc.attach("local", "facts", "The walrus is 4 m long. " * 20)
    assert svc.context_status("local")[0]["cached"] is False
    # a dialogue offering kernel functions as tools: their specs join the system message,
    # which the status cannot rebuild without the kernel: not said
    svc.add("local", "note", "Use &`lookup` when needed.")
    assert svc.context_status("local")[0]["cached"] is None
    # docs too large for the model's 8,192-token context with the rest: retrieved per prompt
    svc.attach("local", "sdk docs", _big_doc() * 4)
    rows = {r["name"]: r for r in svc.context_status("local")}
    assert rows["sdk docs"]["retrieved"] and rows["sdk docs"]["tokens"] > 8192
    assert not rows["facts"]["retrieved"]
    assert d.id


def _big_doc() -> str:
    topics = ["installation with pip and wheels", "configuration files in toml",
              "streaming responses token by token", "authentication with oauth and api keys",
              "pagination with cursors", "retries with exponential backoff and timeouts"]
    return "\n\n".join(f"## {t.split()[0].title()}\n\n" + (f"This part explains {t}. " * 60)
                       for t in topics)


def test_docs_too_large_for_the_budget_are_retrieved_and_marked(svc: DialogueService) -> None:
    svc.create("r", model="claude-sonnet-4-5")
    svc.attach("r", "rules", "Be brief.")
    svc.attach("r", "sdk docs", _big_doc())
    m = svc.add("r", "prompt", "How do retries and backoff work?")
    whole = context.build(svc.open("r"), m.id)
    assert [e.get("retrieved") for e in whole.meta["context"]] == [None, None]
    req = context.build(svc.open("r"), m.id, budget=2000)
    rules, docs = req.meta["context"]
    assert rules == {"kind": "text", "name": "rules", "source": "", "tokens": 3}
    assert docs["name"] == "sdk docs" and docs["of"] >= 6 and docs["retrieved"]
    assert docs["tokens"] <= 2000 - 500
    assert "[retrieved: the" in req.context and f"of {docs['of']} chunks of 'sdk docs'" in req.context
    assert "exponential backoff" in req.context and "oauth" not in req.context
    assert f"[chunk {docs['retrieved'][0]} of {docs['of']}]" in req.context
    assert req.meta["tokens"] <= 2000


def test_cli_attach_sources_list_and_refresh(tmp_path: Path) -> None:
    assert cli(tmp_path, "new", "d", "--model", "claude-sonnet-4-5").returncode == 0
    proj = tmp_path / "proj"
    (proj / "node_modules").mkdir(parents=True)
    (proj / "main.py").write_text("print('hi')\n")
    (proj / "x.bin").write_bytes(b"\0\1\2")
    with PageServer({"/w.html": page("text/html", HTML)}) as srv:
        r = cli(tmp_path, "attach", "d", str(proj))
        assert r.returncode == 0, r.stderr
        assert "attached proj (" in r.stdout and "1 file; skipped 2: node_modules/ (not entered), " \
            "x.bin (binary)" in r.stdout
        r = cli(tmp_path, "attach", "d", "--url", srv.url("/w.html"), "--name", "walrus")
        assert r.returncode == 0 and "attached walrus (" in r.stdout, r.stderr
        r = cli(tmp_path, "attach", "d", "--package", "markdownify")
        assert r.returncode == 0 and "2 modules documented" in r.stdout, r.stderr
        rows = json.loads(cli(tmp_path, "attach", "d", "--json").stdout)
        assert [(x["name"], x["kind"]) for x in rows] == [("proj", "directory"), ("walrus", "url"),
                                                          ("markdownify", "package")]
        assert all(x["tokens"] > 0 and x["cached"] is None for x in rows)
        listed = cli(tmp_path, "attach", "d").stdout
        assert "walrus" in listed and srv.url("/w.html") in listed
        (proj / "more.md").write_text("more\n")
        r = cli(tmp_path, "attach", "d", "--refresh", "proj")
        assert r.returncode == 0 and "refreshed proj: changed" in r.stdout
        r = cli(tmp_path, "attach", "d", "--refresh")
        assert "refreshed walrus: unchanged" in r.stdout and srv.hits["/w.html"] == 2
    r = cli(tmp_path, "attach", "d", "--url", "ftp://example.org/x")
    assert r.returncode == 1 and "not an http(s) URL" in r.stderr
    r = cli(tmp_path, "attach", "d", str(proj / "x.bin"))
    assert r.returncode == 1 and "not a text file" in r.stderr
    r = cli(tmp_path, "attach", "d", str(proj), "--url", "http://x")
    assert r.returncode != 0 and "one thing" in r.stderr


def test_python_api_attaches_and_refreshes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    f = tmp_path / "a.txt"
    f.write_text("alpha\n")
    d = Dialogue.create("api", db=tmp_path / "api.db", model="claude-sonnet-4-5")
    if True:
        loaded = d.attach(f)
        assert loaded.kind == "file" and "6 characters" in loaded.summary()
        assert d.attach(package="markdownify").kind == "package"
        assert d.attach(name="rules", content="Be brief.") is None
        f.write_text("beta\n")
        assert {r["name"]: r.get("changed") for r in d.refresh()}["a.txt"] is True
        assert [r["name"] for r in d.context_status()] == ["a.txt", "markdownify", "rules"]
        with pytest.raises(ValueError):
            d.attach(f, content="x")
