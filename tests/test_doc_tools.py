"""Document tools (doc_tools.py): the model reads and edits its own dialogue, on a real SQLite
file; authorship in the history; stale edits refused; runs and variables through a real
ipykernel; `dialogue.here` editing its own dialogue from a real kernel cell; and whole agentic
turns through the official Anthropic and OpenAI SDKs against the local replay server, plus the
bundled local model's text tool-call format routed to the same tools."""
from __future__ import annotations

import json

import pytest
from servers import ReplayServer, anthropic_events, openai_chunks, sse

from dialogue.doc_tools import GROUPS, TOOLS, DocToolError, DocumentTools, resolve_enabled
from dialogue.history import steps
from dialogue.service import DialogueService
from dialogue.store import ConflictError, acting

BROKEN = 'greeting = "hello"\nprnt(greeting.upper())\n'


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    s = DialogueService(tmp_path / "d.db")
    yield s
    s.close()


def filled(svc: DialogueService) -> tuple[str, list[str]]:
    d = svc.create("t", model="claude-sonnet-4-5")
    ids = [svc.add("t", "note", "# Plan\nGreet the world.").id,
           svc.add("t", "code", BROKEN).id,
           svc.add("t", "prompt", "Fix the failing cell and run it.").id]
    return d.id, ids


async def call(tools: DocumentTools, tool: str, **args) -> tuple[str, bool]:
    return await tools.call(tool, args)


# ---------------------------------------------------------------- each tool on a real store

async def test_list_read_and_find(svc):
    did, (note, code, prompt) = filled(svc)
    svc.edit("t", code, base_version=None, outputs=[
        {"output_type": "error", "ename": "NameError", "evalue": "name 'prnt' is not defined",
         "traceback": ["\x1b[31mNameError\x1b[0m: name 'prnt' is not defined"]}],
        execution_count=1, meta={"run": {"status": "error"}})
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    text, err = await call(t, "list_messages")
    assert not err
    lines = text.splitlines()
    assert lines[0].startswith("3 messages")
    assert lines[1] == f"1. {note} note v1: # Plan"
    assert lines[2].startswith(f"2. {code} code v2 error: greeting")
    assert lines[3] == f"3. {prompt} prompt v1 no answer (this answer): Fix the failing cell and run it."
    text, err = await call(t, "list_messages", start=2, count=1)  # a page of a long listing
    assert not err and text.splitlines() == [
        "3 messages; positions 2 to 2 shown (position. id kind version status: first line)",
        lines[2]]
    text, err = await call(t, "list_messages", start=9)
    assert err and "past the end: the dialogue has 3 messages" in text
    text, err = await call(t, "read_message", id="2")  # a position
    assert not err and f"id {code}" in text and "version 2" in text
    assert BROKEN in text
    # the outputs as text, as the model's context shows them: no escape codes
    assert "<outputs>\nNameError: name 'prnt' is not defined\n</outputs>" in text
    text, err = await call(t, "read_message", id=code[:5])  # an id prefix
    assert not err and BROKEN in text
    text, err = await call(t, "find_text", query="prnt")
    assert not err and f"2. {code} code:" in text and "«prnt»" in text
    text, err = await call(t, "find_text", query="nowhere")
    assert not err and "nothing" in text
    text, err = await call(t, "read_message", id="zzzz9")
    assert err and "no message 'zzzz9'" in text and "list_messages" in text
    text, err = await call(t, "read_message", id="7")
    assert err and "no message at position 7" in text
    text, err = await call(t, "read_message")
    assert err and "bad arguments" in text and "(it takes: id)" in text
    text, err = await call(t, "read_message", id="1", line=3)
    assert err and "unexpected keyword argument 'line'" in text


async def test_add_edit_delete_move(svc):
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    text, err = await call(t, "add_message", after=note, kind="code", source="x = 1")
    assert not err and "at position 2" in text
    added = t.added
    assert [m.id for m in svc.messages("t")] == [note, added, code, prompt]
    text, err = await call(t, "add_message", after="0", kind="note", source="Top")
    assert not err and "at position 1" in text
    top = t.added
    text, err = await call(t, "add_message", after=note, kind="cell", source="x")
    assert err and "kind must be one of" in text
    text, err = await call(t, "edit_message", id=added, source="x = 2")
    assert not err and "version 2" in text
    assert svc.message("t", added).source == "x = 2"
    text, err = await call(t, "move_message", id=top, to=4)
    assert not err and "position 4" in text
    assert [m.id for m in svc.messages("t")] == [note, added, code, top, prompt]
    text, err = await call(t, "move_message", id=top, to=9)
    assert err and "outside the dialogue (1 to 5)" in text
    text, err = await call(t, "delete_message", id=top)
    assert not err and "trash" in text
    assert top not in [m.id for m in svc.messages("t")]
    assert svc.restore_message("t", top).id == top  # the user can bring it back
    # each change is the model's, caused by the answer
    for mid in (added, top):
        vs = svc.history("t", mid)
        assert {(v.author, v.cause) for v in vs if v.op != "restore"} == {("model", prompt)}
    assert svc.history("t", top)[-1].author == "user"  # the user's restore from the trash


async def test_replace_text_only_when_it_occurs_exactly_once(svc):
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    text, err = await call(t, "replace_text", id=code, old="print(", new="x")
    assert err and "occurs 0 times" in text and "nothing changed" in text
    text, err = await call(t, "replace_text", id=code, old="greeting", new="g")
    assert err and "occurs 2 times" in text and "exactly once" in text
    text, err = await call(t, "replace_text", id=code, old="", new="g")
    assert err and "must not be empty" in text
    assert svc.message("t", code).version == 1  # none of those changed anything
    text, err = await call(t, "replace_text", id=code, old="prnt(", new="print(")
    assert not err and "version 2" in text
    assert svc.message("t", code).source == BROKEN.replace("prnt(", "print(")


async def test_a_stale_edit_is_a_conflict_the_model_can_act_on(svc):
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    await call(t, "read_message", id=code)  # the model read version 1
    svc.edit("t", code, base_version=1, source=BROKEN + "# the user's line\n")  # then the user
    for name, args in [("replace_text", {"old": "prnt(", "new": "print("}),
                       ("edit_message", {"source": "print('hi')"}),
                       ("delete_message", {})]:
        text, err = await call(t, name, id=code, **args)
        assert err, name
        assert "changed since you read it (you read version 1, it is now version 2)" in text
        assert "read it again" in text
    assert svc.message("t", code).source.endswith("# the user's line\n")
    text, err = await call(t, "read_message", id=code)  # read again: now the edit works
    assert "the user's line" in text
    text, err = await call(t, "replace_text", id=code, old="prnt(", new="print(")
    assert not err
    # a message the model never read: its edit is based on the current version
    text, err = await call(t, "edit_message", id=note, source="# Plan\nGreet everyone.")
    assert not err


async def test_authorship_in_history_steps_and_restore(svc):
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    await call(t, "replace_text", id=code, old="prnt(", new="print(")
    vs = svc.history("t", code)
    assert [(v.op, v.author, v.cause) for v in vs] == [("create", "user", ""),
                                                       ("edit", "model", prompt)]
    st = steps(vs)
    assert st[-1].summary() == f"edited by model, in answer {prompt}"
    restored = svc.restore_version("t", code, 1)
    assert restored.source == BROKEN
    last = svc.history("t", code)[-1]
    assert (last.op, last.author, last.cause) == ("restore:1", "restore", "")
    assert svc.history_steps("t", code)[-1].summary() == "restored v1"
    # a change inside acting() outside any tool: recorded as said
    with acting("kernel", "cell1"):
        svc.edit("t", note, base_version=None, source="# Plan 2")
    assert svc.history("t", note)[-1].author == "kernel"
    with pytest.raises(ValueError, match="unknown author"):
        with acting("robot"):
            pass


async def test_preview_for_approvals(svc):
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    p = await t.preview("replace_text", {"id": code, "old": "prnt(", "new": "print("})
    assert p["kind"] == "diff"
    assert "-prnt(greeting.upper())" in p["text"] and "+print(greeting.upper())" in p["text"]
    assert await t.preview("run_code", {"id": code}) == {"kind": "code", "text": BROKEN}
    p = await t.preview("add_message", {"after": "1", "kind": "note", "source": "Hi"})
    assert p["kind"] == "diff" and "+Hi" in p["text"]
    p = await t.preview("delete_message", {"id": note})
    assert "-Greet the world." in p["text"]
    assert await t.preview("read_message", {"id": code}) is None
    assert await t.preview("replace_text", {"id": code, "old": "nope", "new": "x"}) is None


async def test_turning_them_on_and_choosing(svc):
    filled(svc)
    assert svc.doc_tools("t") == []  # off by default
    assert resolve_enabled("read,replace_text") == ["list_messages", "read_message", "find_text",
                                                    "read_variable", "replace_text"]
    assert set(GROUPS["read"]) == {n for n, (_, _, ro) in TOOLS.items() if ro}
    d = svc.set_doc_tools("t", "all")
    assert d.meta["doc_tools"] == "all" and svc.doc_tools("t") == list(TOOLS)
    d = svc.set_doc_tools("t", ["read", "run"])
    assert d.meta["doc_tools"] == svc.doc_tools("t") == ["list_messages", "read_message",
                                                         "find_text", "read_variable", "run_code"]
    with pytest.raises(DocToolError, match="no document tool 'frob'"):
        svc.set_doc_tools("t", "read,frob")
    assert svc.doc_tools("t") == d.meta["doc_tools"]  # unchanged by the refusal
    assert "doc_tools" not in svc.set_doc_tools("t", None).meta
    t = svc.doc_tools_for("t", author="model", enabled=["read_message"])
    assert [s.name for s in t.specs()] == ["read_message"]
    spec = t.specs()[0]
    assert spec.reads_only and spec.source == "dialogue"
    assert spec.parameters["required"] == ["id"]
    text, err = await t.call("edit_message", {"id": "1", "source": "x"})
    assert err and "not turned on" in text


async def test_the_toolbox_offers_them_only_when_on(svc):
    from dialogue.llm.base import Request
    did, (note, code, prompt) = filled(svc)
    d, m = svc.open("t"), svc.message("t", prompt)
    assert not svc._runs.toolbox(d, m, None, Request(model="x"))
    svc.set_doc_tools("t", "read,replace_text")
    d = svc.open("t")
    box = svc._runs.toolbox(d, m, None, Request(model="x"))
    assert [s.name for s in box.specs] == resolve_enabled("read,replace_text")
    src = box.source("replace_text")
    assert isinstance(src, DocumentTools) and (src.author, src.cause) == ("model", prompt)


# ---------------------------------------------------------------- a real kernel

async def test_run_code_and_read_variable_in_the_kernel(svc):
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt)
    text, err = await call(t, "read_variable", name="greeting")
    assert err and "kernel is not running" in text
    text, err = await call(t, "run_code", id=code)
    assert not err and "· error" in text and "NameError" in text and "prnt" in text
    text, err = await call(t, "read_variable", name="greeting")
    assert not err and text == "'hello'"
    text, err = await call(t, "read_variable", name="greeting.upper()")
    assert err and "nothing was evaluated" in text
    text, err = await call(t, "read_variable", name="missing")
    assert err and "NameError" in text
    text, err = await call(t, "run_code", id=note)
    assert err and "only code runs" in text
    await call(t, "replace_text", id=code, old="prnt(", new="print(")
    text, err = await call(t, "run_code", id=code)
    assert not err and "· ok" in text and "<outputs>\nHELLO\n</outputs>" in text
    vs = svc.history("t", code)
    # the edit and the run (its clearing and its result) are all the model's
    assert [(v.op, v.author) for v in vs][-3:] == [("edit", "model"), ("run", "model"),
                                                   ("result", "model")]
    assert svc.history_steps("t", code)[-1].summary() == (
        f"edited by model, in answer {prompt} · ran: ok by model, in answer {prompt}")
    await svc.shutdown_kernels()


HERE_CELL = '''
from dialogue.here import read, replace, add, current, run, messages
target = read(2)
fixed = replace(target.id, "prnt(", "print(")
new = add("Fixed by a script.", kind="note")
ids = [m.id for m in messages()]
try:
    run(target.id)
except RuntimeError as e:
    refused = str(e)
try:
    replace(target.id, "greeting", "g")
except ValueError as e:
    twice = str(e)
print(current(), fixed.version, new.id, ids.index(new.id))
'''


async def test_the_kernel_module_from_a_real_cell(svc):
    did, (note, code, prompt) = filled(svc)
    cell = svc.add("t", "code", HERE_CELL.replace("read(2)", f"read({code!r})"))
    svc.start("t", cell.id)
    events = [ev async for ev in svc.subscribe(cell.id)]
    ran = svc.message("t", cell.id)
    assert ran.meta["run"]["status"] == "ok", ran.outputs
    out = "".join(o.get("text", "") for o in ran.outputs).split()
    assert out[0] == cell.id and out[1] == "2"
    new_id = out[2]
    ids = [m.id for m in svc.messages("t")]
    assert ids == [note, code, prompt, cell.id, new_id]  # the note went after the running cell
    assert svc.message("t", code).source == BROKEN.replace("prnt(", "print(")
    v = svc.history("t", code)[-1]
    assert (v.op, v.author, v.cause) == ("edit", "kernel", cell.id)
    assert svc.history_steps("t", code)[-1].summary() == f"edited by kernel, in cell {cell.id}"
    n = svc.history("t", new_id)[0]
    assert (n.author, n.cause) == ("kernel", cell.id)
    # the run tells its listeners (a page) what the cell changed, before it ends
    docs = [ev.data for ev in events if ev.type == "doc"]
    assert docs == [{"op": "edit", "id": code}, {"op": "add", "id": new_id}]
    assert events[-1].type == "done"
    plan = " ".join(str(r) for r in svc.store._x(
        "EXPLAIN QUERY PLAN SELECT v.message_id FROM versions v WHERE v.n > ? AND v.cause = ?",
        (0, "x")))
    assert "SCAN v" not in plan  # only the versions written since the run began are read
    k = await svc.kernel("t")
    assert "cannot be run from a cell" in await k.eval("refused")
    assert "occurs 2 times" in await k.eval("twice")
    await svc.shutdown_kernels()


# ---------------------------------------------------------------- whole agentic turns

def fixing_turns(code: str, call) -> list:
    """The replies of a model that lists, reads, fixes with a replacement, runs, and answers."""
    return [call("c1", "list_messages", {}), call("c2", "read_message", {"id": code}),
            call("c3", "replace_text", {"id": code, "old": "prnt(", "new": "print("}),
            call("c4", "run_code", {"id": code}), call("c5", "delete_message", {"id": "-1"})]


def claude_call(cid, name, args):
    return sse(anthropic_events(tool_uses=[(f"toolu_{cid}", name, args)]))


def openai_call(cid, name, args):
    return sse(openai_chunks(tool_calls=[(f"call_{cid}", name, args)]))


def tool_results_claude(srv) -> list[str]:
    out = []
    for r in srv.requests[1:]:
        block = next(b for b in r.json["messages"][-1]["content"] if b["type"] == "tool_result")
        c = block["content"]
        out.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    return out


def tool_results_openai(srv) -> list[str]:
    return [r.json["messages"][-1]["content"] for r in srv.requests[1:]]


@pytest.mark.parametrize("provider", ["claude", "openai"])
async def test_a_whole_agentic_turn_fixes_a_failing_cell(svc, monkeypatch, provider):
    with ReplayServer() as srv:
        if provider == "claude":
            monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
            monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
            model, call_, final, results = ("claude-sonnet-4-5", claude_call,
                                            sse(anthropic_events(["Fixed: it prints HELLO."])),
                                            tool_results_claude)
        else:
            monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
            monkeypatch.setenv("OPENAI_BASE_URL", srv.openai_base_url)
            model, call_, final, results = ("gpt-4.1-mini", openai_call,
                                            sse(openai_chunks(["Fixed: it prints HELLO."])),
                                            tool_results_openai)
        did, (note, code, prompt) = filled(svc)
        svc.update("t", model=model)
        failed = await svc.run("t", code)
        assert failed.meta["run"]["status"] == "error"
        svc.set_doc_tools("t", "all")
        srv.push(*fixing_turns(code, call_), final)
        asked = []

        def approve(info):  # the user allows each call that asks
            asked.append((info["name"], info["preview"]))
            return "once"

        m = await svc.run("t", prompt, approve=approve)
        assert m.response.endswith("Fixed: it prints HELLO."), (m.response, m.meta)
        assert m.usage["stop_reason"] == "end"
        # the tools were offered with their schemas
        sent = srv.requests[0].json["tools"]
        names = [t["name"] if provider == "claude" else t["function"]["name"] for t in sent]
        assert names == list(TOOLS)
        # reading tools did not ask; the replacement showed its diff, the run its code
        assert [a[0] for a in asked] == ["replace_text", "run_code", "delete_message"]
        assert "+print(greeting.upper())" in asked[0][1]["text"]
        assert asked[1][1] == {"kind": "code", "text": BROKEN.replace("prnt(", "print(")}
        got = results(srv)
        assert f"2. {code} code v{failed.version} error: greeting" in got[0]
        assert f"3. {prompt} prompt v" in got[0] and "answering (this answer)" in got[0]
        assert "NameError" in got[1] and BROKEN in got[1]
        assert got[2].startswith("replaced; message")
        assert "· ok" in got[3] and "HELLO" in got[3]
        # the model cannot delete the answer it is writing (a tool error it can act on)
        assert got[4] == ("this answer is being run or answered now; it cannot be deleted "
                          "until it finishes")
        # stored with the answer: every call and its result
        assert [c["name"] for c in m.tool_calls] == ["list_messages", "read_message",
                                                     "replace_text", "run_code", "delete_message"]
        assert [c["error"] for c in m.tool_calls] == [False, False, False, False, True]
        assert prompt in [x.id for x in svc.messages("t")]
        fixed = svc.message("t", code)
        assert fixed.source == BROKEN.replace("prnt(", "print(")
        assert fixed.meta["run"]["status"] == "ok"
        assert "HELLO" in "".join(o.get("text", "") for o in fixed.outputs)
        summary = svc.history_steps("t", code)[-1].summary()
        assert summary == (f"edited by model, in answer {prompt} · "
                           f"ran: ok by model, in answer {prompt}")
        # the user undoes the model's edit: the old source with its own (failing) outputs
        broken_step = svc.history_steps("t", code)[-2]
        back = svc.restore_version("t", code, broken_step.last)
        assert back.source == BROKEN and back.meta["run"]["status"] == "error"
        last = svc.history("t", code)[-1]
        assert (last.op, last.author) == (f"restore:{broken_step.last}", "restore")
    await svc.shutdown_kernels()


async def test_the_bundled_model_is_offered_them_and_its_call_routes_here(svc):
    """The local model has no native tool format: tools go in the system text and a
    `<tool_call>` block it writes (its start prefilled here, as a user can) becomes a call the
    tool loop routes to the document tools."""
    from dialogue.llm.base import Request, ToolCall, Turn, get_provider
    from dialogue.tools import ToolResult, Toolbox, tool_loop
    did, (note, code, prompt) = filled(svc)
    t = svc.doc_tools_for("t", author="model", cause=prompt, enabled="read")
    box = Toolbox()
    box.add(t, t.specs())
    prov = get_provider("local:default")
    req = Request(model="local:default", system="You edit a notebook.", tools=list(box.specs),
                  max_tokens=24, messages=[Turn("user", "Read message 2.")],
                  prefill='<tool_call>\n{"name": "read_message", "arguments": {"id": "2"}}')
    system = prov.build(req).text
    assert all(name in system for name in GROUPS["read"])
    events = [e async for e in tool_loop(prov, req, box, max_steps=1)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert (calls[0].name, calls[0].arguments) == ("read_message", {"id": "2"})
    first = next(e for e in events if isinstance(e, ToolResult))
    assert not first.error and BROKEN in first.result and f"id {code}" in first.result


# ---------------------------------------------------------------- CLI, Python API, imports

def cli(db, *args):
    import os
    import subprocess
    import sys
    env = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cli_turns_them_on_and_history_names_the_author(svc, tmp_path):
    did, (note, code, prompt) = filled(svc)
    with acting("model", prompt):
        svc.edit("t", code, base_version=None, source=BROKEN.replace("prnt(", "print("))
    db = svc.path
    r = cli(db, "tools", "t")
    assert r.returncode == 0 and "document tools are off" in r.stdout
    r = cli(db, "tools", "t", "--only", "read,replace_text", "--json")
    assert r.returncode == 0, r.stderr
    on = [t["name"] for t in json.loads(r.stdout) if t["on"]]
    assert on == ["list_messages", "read_message", "find_text", "read_variable", "replace_text"]
    r = cli(db, "tools", "t", "--only", "read,frob")
    assert r.returncode == 1 and "no document tool 'frob'" in r.stderr
    assert svc.doc_tools("t") == on  # the refusal changed nothing
    assert cli(db, "tools", "t", "--on").returncode == 0
    assert svc.doc_tools("t") == list(TOOLS)
    assert cli(db, "tools", "t", "--off").returncode == 0 and svc.doc_tools("t") == []
    r = cli(db, "history", "t", code)
    assert r.returncode == 0 and f"edited by model, in answer {prompt}" in r.stdout
    r = cli(db, "history", "t", code, "--versions")
    assert f"model, in answer {prompt}" in r.stdout
    r = cli(db, "history", "t", code, "--json")
    assert [(v["author"], v["cause"]) for v in json.loads(r.stdout)] == [("user", ""),
                                                                        ("model", prompt)]


def test_python_api_turns_them_on(tmp_path, monkeypatch):
    from dialogue import Dialogue
    monkeypatch.setenv("DIALOGUE_DB", str(tmp_path / "api.db"))
    d = Dialogue.create("api", model="claude-sonnet-4-5")
    assert d.doc_tools == []
    d.doc_tools = "read,run"
    assert d.doc_tools == ["list_messages", "read_message", "find_text", "read_variable",
                           "run_code"]
    d.doc_tools = None
    assert d.doc_tools == []


def test_an_imported_file_never_turns_them_on(svc):
    from dialogue.document import Dialogue as Doc, Message
    doc = Doc(name="x", messages=[Message(kind="code", source="1")], meta={"doc_tools": "all"})
    d = svc.import_dialogue(doc, name="imported")
    assert svc.doc_tools(d.id) == []
    rec = svc.import_record(svc.open(d.id))
    assert rec["doc_tools"] == "all"
    assert any("document tools" in w for w in rec["warnings"])
    assert svc.history(d.id, d.messages[0].id)[0].author == "import"


def test_cli_ask_lets_the_model_fix_the_cell_with_yes(svc, tmp_path, monkeypatch):
    """`dialogue ask --yes` (a real process, the Anthropic SDK against the replay server): the
    model reads, replaces and runs; without --yes and without a terminal its changes are denied
    and the cell is untouched."""
    import os
    import subprocess
    import sys
    did, (note, code, prompt) = filled(svc)
    svc.set_doc_tools("t", "all")
    with ReplayServer() as srv:
        env = {**os.environ, "DIALOGUE_DB": str(svc.path), "COLUMNS": "200",
               "ANTHROPIC_BASE_URL": srv.base_url, "ANTHROPIC_API_KEY": "test-key",
               "DIALOGUE_HOME": str(tmp_path / "home")}

        def ask(*extra):
            return subprocess.run([sys.executable, "-m", "dialogue.cli", "ask", "t",
                                   "Fix the cell.", *extra], capture_output=True, text=True,
                                  env=env, timeout=300, stdin=subprocess.DEVNULL)

        srv.push(claude_call("1", "replace_text", {"id": code, "old": "prnt(", "new": "print("}),
                 sse(anthropic_events(["I may not."])))
        r = ask()
        assert r.returncode == 0, r.stderr
        assert "needs approval and standard input is not a terminal: denied" in r.stderr
        assert svc.message("t", code).source == BROKEN
        srv.push(claude_call("2", "read_message", {"id": code}),
                 claude_call("3", "replace_text", {"id": code, "old": "prnt(", "new": "print("}),
                 claude_call("4", "run_code", {"id": code}),
                 sse(anthropic_events(["Fixed."])))
        r = ask("--yes")
        assert r.returncode == 0, r.stderr
        assert "Fixed." in r.stdout
    fixed = svc.message("t", code)
    assert fixed.source == BROKEN.replace("prnt(", "print(")
    assert "HELLO" in "".join(o.get("text", "") for o in fixed.outputs)
    answer = svc.messages("t")[-1]
    assert [c["name"] for c in answer.tool_calls] == ["read_message", "replace_text", "run_code"]
    assert svc.history("t", code)[-1].cause == answer.id


async def test_the_kernel_module_refuses_a_stale_edit(svc):
    """What a cell read is remembered across cells of the kernel: a later edit based on it is
    refused once the user changed the message, until the cell reads it again."""
    did, (note, code, prompt) = filled(svc)
    first = svc.add("t", "code", f"from dialogue.here import read, replace\nm = read({code!r})")
    assert (await svc.run("t", first.id)).meta["run"]["status"] == "ok"
    svc.edit("t", code, base_version=None, source=BROKEN + "# the user's line\n")
    second = svc.add("t", "code", f'''
try:
    replace(m.id, "prnt(", "print(")
except ValueError as e:
    print(e)
replace(read(m.id).id, "prnt(", "print(")
''')
    ran = await svc.run("t", second.id)
    assert ran.meta["run"]["status"] == "ok", ran.outputs
    out = "".join(o.get("text", "") for o in ran.outputs)
    assert "changed since you read it (you read version 1, it is now version 2)" in out
    fixed = svc.message("t", code)
    assert fixed.source == (BROKEN + "# the user's line\n").replace("prnt(", "print(")
    assert svc.history("t", code)[-1].cause == second.id
    await svc.shutdown_kernels()


def tool_use_blocks(body) -> list[dict]:
    return [b for m in body["messages"] if isinstance(m["content"], list)
            for b in m["content"] if b["type"] in ("tool_use", "tool_result")]


async def test_earlier_tool_calls_are_tool_turns_exactly_when_tools_are_offered(svc, monkeypatch):
    """An answer that called document tools is replayed to Claude as tool_use/tool_result turns
    while the dialogue offers tools (document tools count, though they join the toolbox after the
    request is built), and as text when the request offers none (a run with tools off):
    Anthropic's API refuses tool_use blocks in a request without tools."""
    with ReplayServer() as srv:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
        did, (note, code, prompt) = filled(svc)
        svc.set_doc_tools("t", "all")
        srv.push(claude_call("c1", "list_messages", {}), sse(anthropic_events(["Three."])))
        first = await svc.run("t", prompt)
        assert [c["name"] for c in first.tool_calls] == ["list_messages"]
        second = svc.add("t", "prompt", "And now?").id

        def sent_calls(body) -> tuple[list[str], bool, bool]:
            text = json.dumps(body["messages"])
            return ([b["type"] for b in tool_use_blocks(body)], bool(body.get("tools")),
                    "[called list_messages({}); result:" in text)

        srv.push(sse(anthropic_events(["Still three."])))
        await svc.run("t", second)
        assert sent_calls(srv.last.json) == (["tool_use", "tool_result"], True, False)

        srv.push(sse(anthropic_events(["Off."])))
        await svc.run("t", second, tools=False)
        assert sent_calls(srv.last.json) == ([], False, True)
        assert srv.replies_left == 0  # (trial and replay: test_approvals, with a kernel tool)
    await svc.shutdown_kernels()
