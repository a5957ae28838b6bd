"""`dialogue request NAME MSG [--json] [--answer N] [--estimate]`: the recorded request of an
answer (made through the Anthropic SDK against the local replay server), read by the CLI in a
process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dialogue.service import DialogueService
from servers import ReplayServer, anthropic_events, sse


def run(db, home, *args):
    env = {**os.environ, "DIALOGUE_DB": str(db), "DIALOGUE_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.fixture
async def answered(tmp_path, monkeypatch):
    """A dialogue whose prompt (position 4) was answered by "Claude", its request recorded."""
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    svc = DialogueService(tmp_path / "r.db")
    svc.create("rq", model="claude-sonnet-4-5", system="Be exact.")
    svc.add("rq", "note", "a note with \x1b[31mred\x1b[0m in it")
    h = svc.add("rq", "note", "the secret plan")
    svc.set_flags("rq", h.id, hidden=True)
    svc.add("rq", "code", "print(log)")  # no outputs: its source is sent
    p = svc.add("rq", "prompt", "What now?")
    with ReplayServer() as srv:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        srv.push(sse(anthropic_events(["Done."])))
        mid = svc.start("rq", p.id)
        assert [ev async for ev in svc.subscribe(mid)][-1].type == "done"
    version = svc.message("rq", p.id).version
    await svc.aclose()
    return tmp_path / "r.db", tmp_path / "home", p.id, version


def test_request_json_has_every_part(answered):
    db, home, pid, version = answered
    r = run(db, home, "request", "rq", "4", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert {"v", "at", "model", "max_tokens", "temperature", "stop", "prefill", "tokens",
            "token_count", "system", "context", "tools", "tools_tokens", "prompt_tokens", "turns",
            "messages", "dropped", "ref_errors", "adapters", "cache", "answer_version",
            "message"} <= rec.keys()
    assert rec["message"] == pid and rec["answer_version"] == version and rec["v"] == 1
    assert rec["model"] == "claude-sonnet-4-5" and isinstance(rec["max_tokens"], int)
    assert rec["system"] == {"text": "Be exact.", "tokens": 3}
    assert set(rec["context"]) == {"text", "tokens", "entries"}
    (turn,) = rec["turns"]
    assert turn["role"] == "user" and rec["cache"]["turns"] == [0] and len(turn["messages"]) == 3
    assert all(set(p) == {"type", "text"} for p in turn["parts"])
    assert "the secret plan" not in r.stdout
    assert [(e["kind"], e["status"]) for e in rec["messages"]] == [
        ("note", "sent"), ("note", "hidden"), ("code", "sent"), ("prompt", "sent")]
    assert all(isinstance(e["tokens"], int) for e in rec["messages"] if e["status"] == "sent")
    assert rec["cache"]["kind"] == "anthropic" and rec["cache"]["breakpoints"][0]["at"] == "system"
    # the same by id, and by the answer's version
    assert json.loads(run(db, home, "request", "rq", pid, "--answer", str(version), "--json").stdout) == rec


def test_request_plain_form_and_errors(answered):
    db, home, pid, version = answered
    r = run(db, home, "request", "rq", pid)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"request of message {pid} (answer version {version}" in out
    assert "model claude-sonnet-4-5 · max_tokens" in out
    assert "system · 3 tokens · cache breakpoint" in out and "Be exact." in out
    assert "turn 1: user (" in out and "cache breakpoint" in out
    assert "hidden from the model by the user" in out and "the secret plan" not in out
    assert "\x1b" not in out and "\\x1b[31mred" in out  # the note's escape codes shown, not run
    assert "tools offered: none" in out
    # a message with no recorded answer, an old version, a note: one line, exit 1
    for args, words in ((["rq", "1"], "only a prompt's answer"),
                        (["rq", pid, "--answer", "1"], "no request is recorded for answer version 1")):
        bad = run(db, home, "request", *args)
        assert bad.returncode == 1 and words in bad.stderr and "Traceback" not in bad.stderr
    est = run(db, home, "request", "rq", pid, "--estimate", "--json")
    assert est.returncode == 0, est.stderr
    got = json.loads(est.stdout)
    assert got["tokens"] > 0 and got["cached"] == 0 and "no earlier answer" in got["cached_label"]
    plain = run(db, home, "request", "rq", pid, "--estimate").stdout
    assert plain.startswith("~") and "tokens to send" in plain
