"""The CLI never lets a name, a note, an output or a model's answer drive the user's terminal.

Everything is run as a user runs it (a `dialogue` process on a real database; a real kernel; a
real HTTP server standing in for a model) with payloads that set the window title (OSC 0), write
the clipboard (OSC 52), clear the screen, ring the bell, backspace over text, reorder it (bidi
overrides), or hold rich markup. The output may contain the styles rich adds itself (SGR, when it
believes it writes to a terminal) and nothing else that a terminal would act on; the payloads are
shown as text (`\\x1b]0;...`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dialogue.service import DialogueService
from dialogue.terminal import StreamWriter, visible

from servers import ReplayServer, openai_chunks, sse

OSC_TITLE = "\x1b]0;pwned-title\x07"
OSC_CLIP = "\x1b]52;c;cHduZWQ=\x07"
CLEAR = "\x1b[2J\x1b[H"
ERASE = "secret\x08\x08\x08\x08\x08\x08public\rshown"
BIDI = "user\u202egnp.exe"
C1 = "\x9b31mred"
MARKUP = "[/b] oops [bold red]x[/bold red] [link=http://evil.example]y[/link]"
NAME = f"evil{OSC_TITLE}{CLEAR}{MARKUP}"

SGR = re.compile(rb"\x1b\[[0-9;]*m")  # what rich itself writes when it styles text


def assert_inert(raw: bytes) -> str:
    """The output holds no control sequence but rich's own styles; returns it decoded."""
    rest = SGR.sub(b"", raw)
    bad = sorted({b for b in rest if (b < 0x20 and b not in b"\n\t") or b == 0x7F})
    assert not bad, f"raw control bytes {bad} in {raw[:2000]!r}"
    text = rest.decode("utf-8")
    bad_chars = sorted({c for c in text if 0x80 <= ord(c) < 0xA0 or 0x202A <= ord(c) <= 0x202E
                        or 0x2066 <= ord(c) <= 0x2069})
    assert not bad_chars, f"raw control characters {bad_chars} in {text[:2000]!r}"
    return text


def run(db: Path, *args: str, color: bool = True, env: dict | None = None,
        timeout: int = 120) -> subprocess.CompletedProcess:
    """`dialogue ARGS` with its output captured as bytes. `color`: FORCE_COLOR, so rich styles its
    output as on a terminal (and any escape it let through would sit among its own)."""
    e = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "400",
         "DIALOGUE_HOME": str(db.parent / "home"), "DIALOGUE_CACHE_DIR": str(db.parent / "kv")}
    e.pop("FORCE_COLOR", None)
    e.pop("TTY_COMPATIBLE", None)
    if color:
        e["FORCE_COLOR"] = "1"
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          env=e, timeout=timeout)


def ok(db: Path, *args: str, **kw) -> tuple[str, str]:
    """Run, check it succeeded and printed nothing a terminal acts on; (stdout, stderr) as text
    without rich's styles."""
    r = run(db, *args, **kw)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    out, err = assert_inert(r.stdout), assert_inert(r.stderr)
    assert "Traceback" not in err
    return out, err


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cli.db"


def test_the_check_sees_each_payload():
    """The assertions below are only worth something if they fail on what they look for."""
    for payload in (OSC_TITLE, OSC_CLIP, CLEAR, ERASE, BIDI, C1, "a\x07b", "\x1b]8;;http://x\x1b\\"):
        with pytest.raises(AssertionError):
            assert_inert(payload.encode())
        assert_inert(visible(payload).encode())
    assert_inert(b"\x1b[1;31mstyled\x1b[0m\n\ttext")


def test_visible_keeps_text_and_shows_controls():
    assert visible("a\tb\nc\r\nd") == "a\tb\nc\nd"
    assert visible(OSC_TITLE) == "\\x1b]0;pwned-title\\x07"
    assert visible("x\ry\x7f\x9b\u202e") == "x\\x0dy\\x7f\\x9b\\u202e"
    assert visible("naïve — 日本語 🙂") == "naïve — 日本語 🙂"  # printable text untouched


def test_stream_writer_joins_crlf_split_across_pieces(capsys):
    w = StreamWriter()
    for piece in ("one\r", "\ntwo\r", "three\x1b", "[2J\r"):
        w.write(piece)
    w.close()
    assert capsys.readouterr().out == "one\ntwo\\x0dthree\\x1b[2J\\x0d"


def test_a_markup_name_is_text_and_list_keeps_working(db):
    """A name with rich markup once raised MarkupError after the dialogue was created, and from
    then on `dialogue list` failed for the whole database."""
    out, _ = ok(db, "new", "[/b] oops")
    assert "[/b] oops" in out
    ok(db, "new", "plain one")
    for color in (True, False):
        out, _ = ok(db, "list", color=color)
        assert "[/b] oops" in out and "plain one" in out
    out, _ = ok(db, "show", "[/b] oops")
    assert "[/b] oops" in out
    out, _ = ok(db, "rename", "[/b] oops", "[bold]still text[/bold]")
    assert "[bold]still text[/bold]" in out
    out, _ = ok(db, "rm", "[bold]still text[/bold]")
    assert "[bold]still text[/bold]" in out
    out, _ = ok(db, "list", "--trash")
    assert "[bold]still text[/bold]" in out


def test_hostile_names_notes_sources_answers_and_outputs_are_shown_as_text(db):
    out, _ = ok(db, "new", NAME, "--system", f"be {OSC_CLIP} brief")
    assert visible(NAME) in out
    ok(db, "add", NAME, "--note", f"# Title{OSC_TITLE}\nbody {OSC_CLIP} {ERASE} {MARKUP}")
    ok(db, "add", NAME, "--code", f"print('{CLEAR}')  # {BIDI}")
    ok(db, "add", NAME, "--prompt", f"ask {OSC_TITLE} {C1}")
    ok(db, "edit", NAME, "3", "--response", f"the answer {CLEAR}{OSC_CLIP} **bold** {MARKUP}")
    # outputs come from running code; stored here directly as a kernel would have stored them
    svc = DialogueService(db)
    try:
        d = svc.open(NAME)
        svc.add(d.id, "code", "x", outputs=[
            {"output_type": "stream", "name": "stdout", "text": f"out {OSC_TITLE}{ERASE}\n"},
            {"output_type": "error", "ename": "E", "evalue": CLEAR,
             "traceback": [f"\x1b[0;31mE{OSC_CLIP}\x1b[0m"]}])
        did = d.id
    finally:
        svc.close()

    for color in (True, False):
        out, _ = ok(db, "list", color=color)
        assert visible(NAME) in out
        out, _ = ok(db, "show", NAME, color=color)
        for shown in (visible(NAME), visible(OSC_CLIP), visible(OSC_TITLE), visible(CLEAR),
                      visible(BIDI), visible(C1), "[bold red]x[/bold red]"):
            assert shown in out, shown
        assert "bold" in out and "**bold**" not in out  # notes and answers still render as markdown
    # --json stays JSON with its own escapes, and round-trips the exact text
    data = json.loads(ok(db, "show", did, "--json")[0])
    assert data["name"] == NAME and data["messages"][0]["source"].startswith(f"# Title{OSC_TITLE}")

    out, _ = ok(db, "history", NAME, "2")
    assert visible(f"print('{CLEAR}')") in out
    out, _ = ok(db, "search", "pwned")
    assert visible(NAME) in out and "pwned-title" in out
    out, _ = ok(db, "fork", NAME, "2", "--name", f"fork {OSC_TITLE}")
    assert visible(f"fork {OSC_TITLE}") in out
    ok(db, "rm", NAME, "1")
    out, _ = ok(db, "trash")
    assert "pwned-title" in out
    _, err = ok(db, "export", NAME, "--to", "md", "-o", str(db.parent / f"x{OSC_TITLE}.md"))
    # a user mistake naming hostile text is one visible line too
    r = run(db, "show", f"missing {OSC_TITLE}{MARKUP}")
    assert r.returncode == 1
    err = assert_inert(r.stderr)
    assert err.startswith("error: ") and "Traceback" not in err
    r = run(db, "adapters", "use", NAME)
    assert_inert(r.stdout)
    assert_inert(r.stderr)
    assert visible(NAME) in r.stdout.decode() + r.stderr.decode()
    r = run(db, "adapters", "rm", f"none{OSC_CLIP}{MARKUP}")
    assert r.returncode == 1 and "[link=" in assert_inert(r.stderr)


def test_import_prints_the_notebooks_name_as_text(db, tmp_path):
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"dialogue": {"name": f"imported {OSC_TITLE}{MARKUP}"}},
          "cells": [{"cell_type": "markdown", "id": "a1", "metadata": {},
                     "source": f"note {OSC_CLIP}{CLEAR}"},
                    {"cell_type": "code", "id": "a2", "metadata": {}, "execution_count": 1,
                     "source": "print()", "outputs": [
                         {"output_type": "stream", "name": "stdout", "text": f"{ERASE}\n"}]}]}
    path = tmp_path / "hostile.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    out, _ = ok(db, "import", str(path))
    assert visible(f"imported {OSC_TITLE}{MARKUP}") in out
    out, _ = ok(db, "list")
    assert "[link=http://evil.example]" in out
    out, _ = ok(db, "show", f"imported {OSC_TITLE}{MARKUP}")
    assert visible(OSC_CLIP) in out
    # the output's backspaces and carriage return are applied as Jupyter shows them (overwrite):
    # what is stored and printed is the line a terminal would show, "shownc", as plain text
    assert "shownc" in out and "secret" not in out


def test_a_streamed_answer_is_written_as_text(db):
    """`dialogue ask` writes the model's answer as it arrives: control characters made visible
    even when a sequence is split across chunks, CRLF split across chunks still a newline."""
    pieces = ["Hello \x1b", "]0;pwned-title\x07 and ", "\x1b]52;c;cHduZWQ=\x07", " line one\r",
              "\nline two ", CLEAR, " [/b] markup\x07\x08"]
    with ReplayServer() as srv:
        srv.push(sse(openai_chunks(pieces)))
        ok(db, "new", "chat", "--model", f"openai-compatible:{srv.openai_base_url}/m")
        out, err = ok(db, "ask", "chat", "say hi")
        assert srv.requests and srv.last.json["stream"] is True
    joined = "".join(pieces)
    assert out.strip() == visible(joined).strip()
    assert "line one\nline two" in out and "\\x0d" not in out
    # the stored answer is the model's text, exactly
    svc = DialogueService(db)
    try:
        assert svc.open("chat").messages[-1].response == joined
    finally:
        svc.close()
    out, _ = ok(db, "show", "chat")
    assert visible(OSC_TITLE) in out


def test_code_output_streamed_by_exec_and_run_is_text(db):
    """A real kernel prints hostile bytes; `exec` streams them and `run` reports a failure whose
    message holds escapes and markup."""
    ok(db, "new", "k")
    ok(db, "add", "k", "--code", "print(chr(27) + ']0;pwned-title' + chr(7) + '[/b] x' + chr(13) + 'y')")
    ok(db, "add", "k", "--code", "raise ValueError(chr(27) + '[2J [/red] boom')")
    out, _ = ok(db, "exec", "k", "1", timeout=180)
    assert "\\x1b]0;pwned-title\\x07[/b] x" in out
    r = run(db, "run", "k", "--allow-errors", color=False, timeout=180)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    err = assert_inert(r.stderr)
    assert_inert(r.stdout)
    assert "[/red] boom" in err and "failed" in err and "Traceback" not in err
