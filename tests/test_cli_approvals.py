"""Tool call approvals from the command line: `dialogue run` (a real kernel defines the &`fn`
tool, Claude is the local replay server through the official SDK) with --yes, --no-tools, no
terminal (denied, with a line on stderr), and a terminal (a pty) answering y / a / n."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest
from servers import ReplayServer, anthropic_events, sse

from dialogue.service import DialogueService
from test_approvals import BUMP  # the &`bump` tool these tests call


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    db = tmp_path / "cli.db"
    svc = DialogueService(db)
    svc.create("t", model="claude-sonnet-4-5")
    svc.add("t", "code", BUMP)
    p = svc.add("t", "prompt", "Bump the counter by 2 with &`bump`.")
    svc.add("t", "code", "print('counter', counter)")
    svc.close()
    with ReplayServer() as srv:
        env = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "200",
               "ANTHROPIC_BASE_URL": srv.base_url, "ANTHROPIC_API_KEY": "test-key",
               "DIALOGUE_HOME": str(tmp_path / "home")}
        yield srv, env, db, p.id


def cli(env, *args, stdin=subprocess.DEVNULL):
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, stdin=stdin)


def stored(db, mid):
    svc = DialogueService(db)
    try:
        return svc.message("t", mid), svc.open("t")
    finally:
        svc.close()


def push_call(srv, n=2):
    srv.push(sse(anthropic_events(tool_uses=[("toolu_1", "bump", {"n": n})])),
             sse(anthropic_events(["Done."])))


def sent_back(srv) -> str:
    block = next(b for b in srv.requests[1].json["messages"][-1]["content"]
                 if b["type"] == "tool_result")
    return "".join(p["text"] for p in block["content"])


def test_run_yes_allows_tool_calls(setup):
    srv, env, db, pid = setup
    push_call(srv)
    r = cli(env, "run", "t", "--yes")
    assert r.returncode == 0, r.stderr
    m, d = stored(db, pid)
    assert m.tool_calls[0]["result"] == "2" and not m.tool_calls[0]["error"]
    assert sent_back(srv) == "2"
    assert d.messages[-1].outputs[0]["text"] == "counter [2]\n"
    assert "approvals" not in d.meta  # --yes allows for this run only, stores nothing


def test_run_without_a_terminal_denies_with_a_line_on_stderr(setup):
    srv, env, db, pid = setup
    push_call(srv)
    r = cli(env, "run", "t")
    assert r.returncode == 0, r.stderr
    assert ('tool call bump({"n": 2}) needs approval and standard input is not a terminal: '
            "denied (--yes allows tool calls, --no-tools offers none)") in r.stderr
    m, d = stored(db, pid)
    assert m.tool_calls[0]["error"] and m.tool_calls[0]["result"].startswith("denied")
    assert sent_back(srv).startswith("denied: this call needs the user's approval")
    assert d.messages[-1].outputs[0]["text"] == "counter []\n"


def test_run_no_tools_offers_none(setup):
    srv, env, db, pid = setup
    srv.push(sse(anthropic_events(["No tools, so I cannot."])))
    r = cli(env, "run", "t", "--no-tools")
    assert r.returncode == 0, r.stderr
    assert "tools" not in srv.requests[0].json
    m, _ = stored(db, pid)
    assert m.tool_calls == [] and m.response == "No tools, so I cannot."
    r = cli(env, "run", "t", "--yes", "--no-tools")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


@pytest.mark.parametrize("answer,result,always", [("a", "2", ["bump"]), ("y", "2", None),
                                                  ("n", "denied by the user", None),
                                                  ("maybe\nalways", "2", ["bump"])])
def test_run_on_a_terminal_asks(setup, answer, result, always):
    srv, env, db, pid = setup
    push_call(srv)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dialogue.cli", "run", "t"], env=env,
                                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        os.close(slave)
        # typed ahead: the terminal keeps it until the question reads it (nothing else reads)
        os.write(master, answer.encode() + b"\n")
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        os.close(master)
    # a word that is no answer is asked again
    assert stdout.count("Allow? [y]es once, [a]lways in this dialogue, [n]o: ") == \
        1 + answer.count("\n")
    assert 'The model wants to call bump({"n": 2})' in stderr
    m, d = stored(db, pid)
    assert m.tool_calls[0]["result"] == result
    assert d.meta.get("approvals", {}).get("always") == always


def test_show_lists_tool_calls_and_results(setup):
    srv, env, db, pid = setup
    push_call(srv)
    assert cli(env, "run", "t", "--yes").returncode == 0
    r = cli(env, "show", "t")
    assert r.returncode == 0, r.stderr
    assert 'tool bump({"n": 2}) -> 2' in r.stdout
