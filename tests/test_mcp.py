"""MCP servers' tools: configuration, real servers (stdio and streamable HTTP, tests/mcp_server.py),
a call routed through the tool loop from a Claude prompt (the SDK against the local replay
server), a server that crashes, one that hangs, one that never starts, and imports that try to
configure one."""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dialogue import mcptools
from dialogue.document import Dialogue, Kind, Message
from dialogue.service import DialogueService
from servers import ReplayServer, anthropic_events, sse

SERVER = str(Path(__file__).parent / "mcp_server.py")


def stdio(*extra: str, **entry) -> dict:
    return {"command": sys.executable, "args": [SERVER, *extra], **entry}


@pytest.fixture
def mcp_file(tmp_path, monkeypatch):
    """The global MCP config file, empty at first; write(servers) fills it."""
    path = tmp_path / "mcp.json"
    monkeypatch.setenv("DIALOGUE_MCP_CONFIG", str(path))

    def write(servers: dict) -> Path:
        path.write_text(json.dumps({"mcpServers": servers}))
        return path
    return write


@pytest.fixture
async def svc(tmp_path):
    s = DialogueService(tmp_path / "mcp.db")
    yield s
    await s.aclose()


def stdio_servers() -> list[str]:
    """The test server's stdio processes running now (their command lines)."""
    got = subprocess.run(["pgrep", "-af", SERVER], capture_output=True, text=True).stdout
    return [ln for ln in got.splitlines() if "--http" not in ln]


def claude_prompt(svc, name: str, enable: list[str], source: str, monkeypatch, srv) -> Message:
    """A Claude dialogue `name` using MCP servers `enable`, its prompt, the SDK pointed at `srv`."""
    svc.create(name, model="claude-sonnet-4-5")
    svc.set_mcp(name, enable=enable)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    return svc.add(name, "prompt", source)


async def toolbox(svc, name: str):
    """The Toolbox an answer in dialogue `name` gets from its MCP servers."""
    from dialogue.tools import Toolbox
    box = Toolbox()
    await mcptools.offer(svc.mcp, svc.open(name), box)
    return box


@pytest.fixture(scope="module")
def http_server():
    """The test server on streamable HTTP, 127.0.0.1, a free port."""
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    p = subprocess.Popen([sys.executable, SERVER, "--http", str(port), "--name", "web"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as so:
                if so.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert p.poll() is None, "the HTTP MCP server exited"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        p.terminate()
        p.wait(10)


# ---------------------------------------------------------------- configuration

def test_the_mcpservers_shape_is_read_and_bad_entries_are_named(tmp_path):
    got = mcptools.parse_servers({"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "srv"], "env": {"A": "1"}, "autoApprove": []},
        "web": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer k"},
                "type": "http"}}})
    assert got["files"].transport == "stdio" and got["files"].describe() == "npx -y srv"
    assert got["files"].env == (("A", "1"),)
    assert got["web"].transport == "http" and got["web"].describe() == "https://example.com/mcp"
    assert "Bearer" not in got["web"].describe()  # header values are never shown
    assert got["files"].to_entry() == {"command": "npx", "args": ["-y", "srv"], "env": {"A": "1"}}
    for bad, why in [({"x": {}}, "exactly one of"),
                     ({"x": {"command": "a", "url": "http://h"}}, "exactly one of"),
                     ({"x": {"url": "file:///etc/passwd"}}, "http:// or https://"),
                     ({"x": {"command": "a", "args": "b"}}, "args must be a list"),
                     ({"x": {"command": "a", "env": {"A": 1}}}, "env must be an object"),
                     ({"x": {"url": "http://h", "type": "sse"}}, "SSE transport"),
                     ({"": {"command": "a"}}, "name must be"),
                     ([1], "expected")]:
        with pytest.raises(mcptools.MCPConfigError, match=why):
            mcptools.parse_servers({"mcpServers": bad} if isinstance(bad, dict) else bad)
    p = tmp_path / "mcp.json"
    p.write_text("{not json")
    with pytest.raises(mcptools.MCPConfigError, match="not valid JSON"):
        mcptools.global_servers(p)
    assert mcptools.global_servers(tmp_path / "none.json") == {}
    # tool names every provider accepts
    assert mcptools.tool_name("my server", "read.file") == "my_server__read_file"
    long = mcptools.tool_name("s" * 40, "t" * 40)
    assert len(long) == 64 and long != mcptools.tool_name("s" * 40, "t" * 41)


async def test_a_dialogue_enables_servers_configured_globally_or_its_own(svc, mcp_file):
    mcp_file({"calc": stdio()})
    d = svc.create("cfg")
    with pytest.raises(ValueError, match="'nope'.* configured nowhere"):
        svc.set_mcp("cfg", enable=["nope"])
    assert svc.open("cfg").version == d.version  # nothing changed
    d = svc.set_mcp("cfg", enable=["calc"])
    d = svc.set_mcp("cfg", servers={"mcpServers": {"own": {"url": "http://127.0.0.1:9/mcp"}}},
                    enable=["own"])
    assert d.meta["mcp"] == {"servers": {"own": {"url": "http://127.0.0.1:9/mcp"}},
                             "enabled": ["calc", "own"]}
    listed = {s["name"]: s for s in svc.mcp_servers("cfg")}
    assert listed["calc"]["origin"] == "global" and listed["own"]["origin"] == "dialogue"
    assert listed["calc"]["enabled"] and not listed["calc"]["running"]
    with pytest.raises(ValueError, match="command"):
        svc.set_mcp("cfg", servers={"bad": {"args": []}})
    # a server taken out of the global file: shown as missing, an answer says so, and it can
    # still be switched off (other changes are not blocked by it)
    mcp_file({})
    listed = {s["name"]: s for s in svc.mcp_servers("cfg")}
    assert listed["calc"] == {"name": "calc", "origin": "missing", "transport": "",
                              "runs": "configured nowhere", "enabled": True, "running": False}
    (gone,) = await svc.mcp_list("cfg", "calc")
    assert "enabled but configured nowhere" in gone["error"]
    with pytest.raises(ValueError, match="'calc'.* configured nowhere"):
        mcptools.servers_for(svc.open("cfg"))
    svc.set_mcp("cfg", disable=["own"])
    d = svc.set_mcp("cfg", remove=["own"], disable=["calc"])
    assert "mcp" not in d.meta
    ops = [v.op for v in svc.store.history(d.id)]
    assert ops.count("mcp") == 4  # versioned like every setting (the refused ones wrote nothing)


# ---------------------------------------------------------------- real servers

async def test_stdio_and_http_servers_list_their_tools_and_answer(svc, mcp_file, http_server):
    mcp_file({"calc": stdio(env={"SECRET_WORD": "swordfish"}),
              "web": {"url": http_server, "headers": {"X-Token": "tok-123"}},
              "broken": {"command": sys.executable, "args": ["-c", "import sys; sys.exit(2)"]}})
    svc.create("both")
    svc.set_mcp("both", enable=["calc", "web"])
    listed = {s["name"]: s for s in await svc.mcp_list("both")}
    for name in ("calc", "web"):
        assert listed[name]["error"] is None and listed[name]["running"]
        tools = {t["name"]: t for t in listed[name]["tools"]}
        assert tools["add"]["reads_only"] and not tools["echo"]["reads_only"]
        assert tools["add"]["offered_as"] == f"{name}__add"
        assert tools["add"]["description"] == "Add two whole numbers."
        assert tools["add"]["parameters"]["required"] == ["a", "b"]
    assert listed["broken"]["error"].startswith("MCP server 'broken'")
    assert "could not start" in listed["broken"]["error"] and not listed["broken"]["enabled"]
    assert [s["name"] for s in await svc.mcp_list("both", "web")] == ["web"]
    with pytest.raises(Exception, match="no MCP server 'zz'"):
        await svc.mcp_list("both", "zz")

    box = await toolbox(svc, "both")
    specs = {s.name: s for s in box.specs}
    assert specs["calc__add"].source == "mcp:calc" and specs["calc__add"].reads_only
    assert specs["web__echo"].source == "mcp:web" and not specs["web__echo"].reads_only
    assert await box.call("calc__add", {"a": 2, "b": 40}) == ("42", False)
    assert await box.call("web__add", {"a": 1, "b": 1}) == ("2", False)
    assert await box.call("calc__env", {"name": "SECRET_WORD"}) == ("swordfish", False)
    assert await box.call("web__header", {"name": "x-token"}) == ("tok-123", False)
    text, err = await box.call("calc__picture", {})
    assert not err and text == "a tiny picture:\n[image image/png, 72 bytes, not shown]"
    assert await box.call("web__doc", {}) == (
        "[resource file:///notes.txt]\nthe notes\n[resource file:///big.bin (big)]", False)
    text, err = await box.call("calc__big", {"n": 30_000})  # cut like a kernel tool's result
    assert not err and text == "x" * 20_000 + "\n[result cut: 10,000 more characters]"
    text, err = await box.call("calc__fail", {})
    assert err and "fail" in text
    text, err = await box.call("calc__add", {"a": "x"})
    assert err  # the server refuses bad arguments; the model is told
    prev = await box.source("web__echo").preview("web__echo", {"text": "hi"})
    assert prev["kind"] == "text" and http_server in prev["text"] and '"hi"' in prev["text"]
    # one running server per configuration, kept between answers
    conn = svc.mcp.peek(mcptools.configured(None)["calc"])
    assert conn.starts == 1 and conn.running
    await toolbox(svc, "both")
    assert conn.starts == 1


async def test_a_server_that_crashes_gives_a_clear_error_and_restarts(svc, mcp_file):
    mcp_file({"calc": stdio()})
    svc.create("crash")
    svc.set_mcp("crash", enable=["calc"])
    box = await toolbox(svc, "crash")
    text, err = await box.call("calc__crash", {})
    assert err and text.startswith("MCP server 'calc' stopped while running crash")
    assert "starts again on next use" in text
    conn = svc.mcp.peek(mcptools.configured(None)["calc"])
    assert not conn.running
    assert await box.call("calc__add", {"a": 1, "b": 2}) == ("3", False)
    assert conn.starts == 2


async def test_a_server_that_hangs_times_out_clearly(svc, mcp_file, monkeypatch):
    monkeypatch.setenv("DIALOGUE_MCP_CALL_TIMEOUT", "1.5")
    mcp_file({"calc": stdio()})
    svc.create("hang")
    svc.set_mcp("hang", enable=["calc"])
    box = await toolbox(svc, "hang")
    t0 = time.monotonic()
    text, err = await box.call("calc__hang", {})
    assert err and time.monotonic() - t0 < 5
    assert text == ("MCP server 'calc' did not answer hang within 1.5 s "
                    "(DIALOGUE_MCP_CALL_TIMEOUT); the server was stopped and starts again on "
                    "next use")
    assert await box.call("calc__add", {"a": 1, "b": 2}) == ("3", False)


async def test_a_server_that_never_starts_hits_the_start_timeout(svc, mcp_file, monkeypatch):
    monkeypatch.setenv("DIALOGUE_MCP_START_TIMEOUT", "1")
    mcp_file({"mute": {"command": sys.executable,
                       "args": ["-c", "import sys, time; print('warming up', file=sys.stderr, "
                                      "flush=True); time.sleep(60)"]},
              "missing": {"command": "/nonexistent/mcp-server"}})
    listed = {s["name"]: s for s in await svc.mcp_list()}
    assert "did not start within 1 s (DIALOGUE_MCP_START_TIMEOUT)" in listed["mute"]["error"]
    assert "it said: warming up" in listed["mute"]["error"]
    assert "could not start" in listed["missing"]["error"]
    monkeypatch.setenv("DIALOGUE_MCP_START_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DIALOGUE_MCP_START_TIMEOUT must be a positive number"):
        await svc.mcp_list()


# ---------------------------------------------------------------- a whole turn

async def test_claude_calls_an_mcp_tool_through_the_tool_loop(svc, mcp_file, monkeypatch):
    mcp_file({"calc": stdio()})
    with ReplayServer() as srv:
        m = claude_prompt(svc, "turn", ["calc"], "What is 2 + 40? Then say it back.",
                          monkeypatch, srv)
        srv.push(sse(anthropic_events(["Adding."], tool_uses=[("toolu_1", "calc__add",
                                                                {"a": 2, "b": 40})])),
                 sse(anthropic_events([], tool_uses=[("toolu_2", "calc__echo",
                                                      {"text": "forty-two"})])),
                 sse(anthropic_events(["It is 42."])))
        asked = []

        def approve(info):  # echo changes nothing here but is not marked read-only: it asks
            asked.append((info["name"], info["source"], info["preview"]["text"]))
            return "once"
        final = await svc.run("turn", m.id, approve=approve)
        first, second, third = (r.json for r in srv.requests)
    assert final.response == "Adding.It is 42." and not final.meta.get("error")
    offered = {t["name"]: t for t in first["tools"]}
    assert offered["calc__add"]["description"] == "Add two whole numbers."
    assert offered["calc__add"]["input_schema"]["required"] == ["a", "b"]
    results = [b for b in second["messages"][-1]["content"] if b["type"] == "tool_result"]
    assert results[0]["tool_use_id"] == "toolu_1" and "42" in json.dumps(results[0]["content"])
    results = [b for b in third["messages"][-1]["content"] if b["type"] == "tool_result"]
    assert "forty-two" in json.dumps(results[0]["content"])
    # the read-only add ran without asking; echo asked, showing the server and the call
    assert [a[:2] for a in asked] == [("calc__echo", "mcp:calc")]
    assert "MCP server 'calc'" in asked[0][2] and "forty-two" in asked[0][2]
    calls = {c["name"]: c for c in final.tool_calls}
    assert calls["calc__add"]["result"] == "42" and not calls["calc__add"]["error"]
    assert calls["calc__echo"]["result"] == "forty-two"


async def test_a_server_that_cannot_start_ends_the_answer_with_its_error(svc, mcp_file,
                                                                          monkeypatch):
    mcp_file({"gone": {"command": "/nonexistent/mcp-server"}})
    with ReplayServer() as srv:
        m = claude_prompt(svc, "fail", ["gone"], "hi", monkeypatch, srv)
        final = await svc.run("fail", m.id)
        assert srv.requests == []  # nothing was sent
    assert final.meta["error"].startswith("MCP server 'gone' (/nonexistent/mcp-server) could "
                                          "not start")


async def test_openai_calls_an_mcp_tool_over_http(svc, mcp_file, monkeypatch, http_server):
    from servers import openai_chunks
    mcp_file({"web": {"url": http_server}})
    svc.create("oa", model="gpt-4o")
    svc.set_mcp("oa", enable=["web"])
    m = svc.add("oa", "prompt", "2 + 3?")
    with ReplayServer() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        srv.push(sse(openai_chunks([], tool_calls=[("call_1", "web__add", {"a": 2, "b": 3})])),
                 sse(openai_chunks(["5."])))
        final = await svc.run("oa", m.id)
        first, second = (r.json for r in srv.requests)
    assert final.response == "5." and final.tool_calls[0]["result"] == "5"
    assert "web__add" in [t["function"]["name"] for t in first["tools"]]
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "5"}


# ---------------------------------------------------------------- files from elsewhere

async def test_an_imported_notebook_cannot_configure_or_enable_a_server(svc, mcp_file, tmp_path):
    marker = tmp_path / "ran"
    mcp_file({"calc": stdio()})
    evil = {"servers": {"pwn": {"command": sys.executable,
                                "args": ["-c", f"open({str(marker)!r}, 'w')"]},
                        "calc": {"url": "http://attacker.example/mcp"}},
            "enabled": ["pwn", "calc"]}
    doc = Dialogue(name="shared", meta={"mcp": evil},
                   messages=[Message(kind=Kind.prompt, source="hi")])
    d = svc.import_dialogue(doc)
    assert "mcp" not in d.meta
    rec = svc.import_record(d)
    assert rec["mcp"] == {"servers": ["pwn", "calc"], "enabled": ["pwn", "calc"]}
    assert any("MCP servers were not used" in w and "'pwn'" in w for w in rec["warnings"])
    assert "attacker" not in json.dumps(rec)  # names only
    assert svc.mcp_servers(d.id) == [{"name": "calc", "origin": "global", "transport": "stdio",
                                      "runs": f"{sys.executable} {SERVER}", "enabled": False,
                                      "running": False}]
    box = await toolbox(svc, d.id)
    assert not box and not marker.exists()
    # and export keeps this machine's servers (and their keys) out of the file
    svc.set_mcp(d.id, servers={"own": {"url": "http://127.0.0.1:9/mcp",
                                       "headers": {"Authorization": "Bearer secret"}}},
                enable=["own"])
    from dialogue.artifacts import to_ipynb_bytes
    out = to_ipynb_bytes(svc.for_notebook(svc.open(d.id))).decode()
    assert "Bearer secret" not in out and "127.0.0.1:9" not in out, out


# ---------------------------------------------------------------- the command line

def test_the_cli_lists_servers_and_tools_and_enables_them(tmp_path, mcp_file):
    import os
    path = mcp_file({"calc": stdio(), "gone": {"command": "/nonexistent/mcp-server"}})
    env = {**os.environ, "DIALOGUE_DB": str(tmp_path / "cli.db"), "COLUMNS": "200",
           "DIALOGUE_CONFIG": str(tmp_path / "config.toml"), "DIALOGUE_MCP_CONFIG": str(path)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                              text=True, env=env, timeout=180)
    assert cli("new", "d").returncode == 0
    got = cli("mcp", "list")
    assert got.returncode == 0, got.stderr
    assert "calc (global, stdio:" in got.stdout and "10 tools" in got.stdout
    assert "calc__add" in got.stdout and "Add two whole numbers." in got.stdout
    assert "gone (global, stdio: /nonexistent/mcp-server): cannot start" in got.stdout
    assert f"global servers: {path}" in got.stdout
    got = cli("mcp", "enable", "d", "calc")
    assert got.returncode == 0 and "uses MCP servers: calc" in got.stdout
    got = cli("mcp", "enable", "d", "zz")
    assert got.returncode == 1 and "'zz' are configured nowhere" in got.stderr
    got = cli("mcp", "add", "d", "own", "--command", sys.executable, f"--arg={SERVER}",
              "--env", "SECRET_WORD=x")
    assert got.returncode == 0 and "uses MCP servers: calc, own" in got.stdout, got.stderr
    got = cli("mcp", "list", "own", "--dialogue", "d", "--json")
    data = json.loads(got.stdout)
    assert [s["name"] for s in data["servers"]] == ["own"]
    assert data["servers"][0]["origin"] == "dialogue" and data["servers"][0]["enabled"]
    assert "own__echo" in [t["offered_as"] for t in data["servers"][0]["tools"]]
    assert cli("mcp", "disable", "d", "calc", "own").stdout.strip().endswith("servers: none")
    got = cli("mcp", "add", "d", "both", "--command", "x", "--url", "http://h")
    assert got.returncode == 1 and "give --command" in got.stderr
    # the servers a command started ended with it
    assert stdio_servers() == []


# ---------------------------------------------------------------- the Python API

def test_python_api_configures_lists_and_uses_mcp_tools(tmp_path, mcp_file, monkeypatch):
    from dialogue import Dialogue as Handle
    from dialogue import api
    mcp_file({"calc": stdio()})
    h = Handle.create("api-mcp", db=tmp_path / "api.db", model="claude-sonnet-4-5")
    try:
        assert [(s["name"], s["enabled"]) for s in h.mcp] == [("calc", False)]
        h.enable_mcp("calc")
        h.add_mcp("own", stdio(), enable=False)
        assert {s["name"]: s["enabled"] for s in h.mcp} == {"calc": True, "own": False}
        listed = {s["name"]: s for s in h.mcp_tools("calc")}
        assert "calc__add" in [t["offered_as"] for t in listed["calc"]["tools"]]
        with ReplayServer() as srv:
            srv.push(sse(anthropic_events([], tool_uses=[("toolu_1", "calc__add",
                                                          {"a": 20, "b": 22})])),
                     sse(anthropic_events(["42."])))
            monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
            monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
            m = h.ask("20 + 22?")
        assert m.response == "42." and m.tool_calls[0]["result"] == "42"
        h.remove_mcp("own")
        h.disable_mcp("calc")
        assert [(s["name"], s["enabled"]) for s in h.mcp] == [("calc", False)]
    finally:
        api.shutdown()


async def test_an_edited_global_entry_replaces_its_running_server(svc, mcp_file):
    mcp_file({"calc": stdio()})
    svc.create("edit")
    svc.set_mcp("edit", enable=["calc"])
    box = await toolbox(svc, "edit")
    old = svc.mcp.peek(mcptools.configured(None)["calc"])
    assert old.running
    mcp_file({"calc": stdio(env={"SECRET_WORD": "new"})})
    box = await toolbox(svc, "edit")
    assert await box.call("calc__env", {"name": "SECRET_WORD"}) == ("new", False)
    assert not old.running
    for _ in range(100):  # the old process ends in the background
        if len(stdio_servers()) == 1:
            break
        await asyncio.sleep(0.1)
    assert len(stdio_servers()) == 1


async def test_a_server_that_died_while_idle_is_started_again_by_the_next_answer(svc, mcp_file):
    import os
    import signal
    mcp_file({"calc": stdio()})
    svc.create("idle")
    svc.set_mcp("idle", enable=["calc"])
    await toolbox(svc, "idle")
    conn = svc.mcp.peek(mcptools.configured(None)["calc"])
    (pid,) = [int(ln.split()[0]) for ln in stdio_servers()]
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not stdio_servers():
            break
        await asyncio.sleep(0.1)
    box = await toolbox(svc, "idle")  # the next answer's start pings it, and starts it again
    assert await box.call("calc__add", {"a": 1, "b": 1}) == ("2", False)
    assert conn.starts == 2


async def test_a_servers_instructions_reach_the_model_and_the_request_view(svc, mcp_file,
                                                                           monkeypatch):
    """What an enabled server's initialize result says to clients (`instructions`) is sent in
    the context after the attached items, and listed as an "mcp" part of the recorded request
    (the web's Request panel too); a dialogue that does not enable the server gets none of it."""
    from fasthtml.common import to_xml

    from dialogue.web.routes.requests import panel
    said = "Use calc__add for every sum; never add numbers in your head."
    mcp_file({"calc": stdio("--instructions", said), "plain": stdio("--name", "plain")})
    with ReplayServer() as srv:
        m = claude_prompt(svc, "ins", ["calc", "plain"], "What is 2 + 40?", monkeypatch, srv)
        svc.attach("ins", "glossary", "sum: the result of adding")
        srv.push(sse(anthropic_events(["42."])))
        final = await svc.run("ins", m.id)
        body = srv.last.json
        other = claude_prompt(svc, "without", ["plain"], "What is 2 + 40?", monkeypatch, srv)
        srv.push(sse(anthropic_events(["42."])))
        await svc.run("without", other.id)
        body_without = srv.last.json
    assert final.response == "42." and not final.meta.get("error")
    ctx = body["system"][-1]["text"]
    assert f'<context mcp_server="calc">\n{said}\n</context>' in ctx
    assert ctx.index("sum: the result of adding") < ctx.index(said)  # after the attachments
    assert "mcp_server" not in json.dumps(body_without["system"])  # plain has none; calc is off
    rec = svc.sent_request("ins", m.id)
    entries = rec["context"]["entries"]
    assert [(e["kind"], e["name"]) for e in entries] == [("text", "glossary"), ("mcp", "calc")]
    mcp = entries[1]
    assert mcp["source"] == " ".join([sys.executable, SERVER, "--instructions", said])
    assert mcp["tokens"] > 10 and rec["context"]["tokens"] >= mcp["tokens"] + entries[0]["tokens"]
    html = to_xml(panel(rec))
    assert "context: mcp calc" in html and said in html
    # a server's instructions are capped: the rest is said to be cut
    from dialogue.llm.base import Request
    conn = svc.mcp.connection(mcptools.servers_for(svc.open("ins"))[0])
    conn.instructions = "y" * (mcptools.MAX_INSTRUCTIONS + 50)
    req = Request(model="claude-sonnet-4-5", messages=[], meta={"tokens": 5})
    mcptools.add_instructions(req, [conn])
    assert req.context.count("y") == mcptools.MAX_INSTRUCTIONS
    assert f"{mcptools.MAX_INSTRUCTIONS + 50:,} characters" in req.context
    assert req.meta["tokens"] == 5 + req.meta["context"][0]["tokens"]
