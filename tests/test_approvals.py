"""Approvals of the model's tool calls (approvals.py), through the whole path: the official
Anthropic SDK against the local replay server (tests/servers.py) scripting tool_use replies, a
real ipykernel running the dialogue's &`fn` tools, a real SQLite file. Plus the policy itself on
a Toolbox with a reading tool, and a killed process whose pending approval is stored as denied."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from servers import ReplayServer, anthropic_events, sse

from dialogue import approvals
from dialogue.approvals import DENIED, ENDED, UNATTENDED, ApprovalError, Gate
from dialogue.llm.base import ToolCall, ToolSpec
from dialogue.service import DialogueService
from dialogue.store import Store
from dialogue.tools import Toolbox

BUMP = '''
counter = []
def bump(n: int) -> int:
    "Add n to the counter and return the total."
    counter.append(n)
    return sum(counter)
'''


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    s = DialogueService(tmp_path / "a.db")
    yield s
    s.close()


@pytest.fixture
def srv(monkeypatch):
    with ReplayServer() as s:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", s.base_url)
        yield s


def tool_turn(tid: str, n: int = 2) -> object:
    return sse(anthropic_events(tool_uses=[(tid, "bump", {"n": n})]))


async def dialogue_with_bump(svc: DialogueService) -> str:
    svc.create("t", model="claude-sonnet-4-5")
    code = svc.add("t", "code", BUMP)
    ran = await svc.run("t", code.id)
    assert svc.run_status(ran) == "ok"
    return svc.add("t", "prompt", "Bump the counter by 2 with &`bump`.").id


def tool_result_sent(srv: ReplayServer, i: int = 1) -> str:
    """The text of the tool_result block the model got back in request `i`."""
    last = srv.requests[i].json["messages"][-1]
    block = next(b for b in last["content"] if b["type"] == "tool_result")
    return "".join(p["text"] for p in block["content"])


async def counter(svc: DialogueService) -> str:
    return await (await svc.kernel("t")).eval("counter")


async def test_a_kernel_tool_asks_and_deny_tells_the_model(svc, srv):
    p = await dialogue_with_bump(svc)
    srv.push(tool_turn("toolu_1"), sse(anthropic_events(["Fine, I will not."])))
    mid = svc.start("t", p, approve="ask")
    seen = []
    async for ev in svc.subscribe(mid):
        seen.append(ev)
        if ev.type == "approval" and "decision" not in ev.data:
            assert ev.data["name"] == "bump" and ev.data["arguments"] == {"n": 2}
            assert ev.data["source"] == "kernel" and ev.data["reads_only"] is False
            # pending on the stored message (another process, or a reloaded page, sees it) ...
            with Store(svc.path) as other:
                stored = other.get_message(mid)
            assert [x["id"] for x in stored.meta["pending"]] == ["toolu_1"]
            assert stored.tool_calls[0]["name"] == "bump"
            # ... and in the run's state a page renders
            assert [x["id"] for x in svc.live(mid).pending] == ["toolu_1"]
            with pytest.raises(ApprovalError):
                svc.approve(mid, "toolu_1", "maybe")
            svc.approve(mid, "toolu_1", "deny")
            with pytest.raises(ApprovalError):  # answered already
                svc.approve(mid, "toolu_1", "once")
    decided = [e.data for e in seen if e.type == "approval" and "decision" in e.data]
    assert decided == [{"id": "toolu_1", "name": "bump", "arguments": {"n": 2},
                        "decision": "deny", "reason": "the user"}]
    assert tool_result_sent(srv) == DENIED
    m = svc.message("t", mid)
    assert m.response == "Fine, I will not."
    assert m.tool_calls == [{"id": "toolu_1", "name": "bump", "arguments": {"n": 2},
                             "result": DENIED, "error": True}]
    assert "pending" not in m.meta
    assert await counter(svc) == "[]"  # never ran
    await svc.shutdown_kernels()


async def test_always_allow_persists_and_later_calls_do_not_ask(svc, srv):
    p = await dialogue_with_bump(svc)
    v0 = svc.open("t", messages=False).version
    srv.push(tool_turn("toolu_1"), tool_turn("toolu_2", 3), sse(anthropic_events(["Total 5."])))
    mid = svc.start("t", p, approve="ask")
    asked = []
    async for ev in svc.subscribe(mid):
        if ev.type == "approval" and "decision" not in ev.data:
            asked.append(ev.data["id"])
            svc.approve(mid, ev.data["id"], "always")
    assert asked == ["toolu_1"]  # the second call of bump in the same answer did not ask
    assert tool_result_sent(srv, 1) == "2"
    assert tool_result_sent(srv, 2) == "5"
    d = svc.open("t", messages=False)
    assert d.meta["approvals"] == {"always": ["bump"], "ask_reads": False}
    assert d.version == v0 + 1  # a version of the dialogue's settings, like every setting
    # a later answer, even one that would deny anything it had to ask, runs bump
    p2 = svc.add("t", "prompt", "Once more with &`bump`.").id
    srv.push(tool_turn("toolu_3", 1), sse(anthropic_events(["6."])))
    m = await svc.run("t", p2, approve=False)
    assert m.tool_calls[0]["result"] == "6" and not m.tool_calls[0]["error"]
    # the earlier answer's calls and results were replayed to the model as tool turns
    msgs = srv.requests[3].json["messages"]
    assert [m_["role"] for m_ in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert [(b["type"], b.get("id") or b.get("tool_use_id")) for b in msgs[1]["content"]] == \
        [("tool_use", "toolu_1"), ("tool_use", "toolu_2")]
    assert [b["type"] for b in msgs[2]["content"]] == ["tool_result", "tool_result"]
    assert msgs[2]["content"][1]["content"] == [{"type": "text", "text": "5"}]
    assert msgs[3]["content"][0]["text"] == "Total 5."
    # taken back: it asks (here: nobody to ask, denied) again
    svc.allow_tool("t", "bump", False)
    p3 = svc.add("t", "prompt", "And again &`bump`.").id
    srv.push(tool_turn("toolu_4", 1), sse(anthropic_events(["No."])))
    m = await svc.run("t", p3)
    assert m.tool_calls[0]["result"] == UNATTENDED and m.tool_calls[0]["error"]
    assert await counter(svc) == "[2, 3, 1]"
    await svc.shutdown_kernels()


async def test_allow_all_no_tools_and_a_callable(svc, srv):
    p = await dialogue_with_bump(svc)
    srv.push(tool_turn("toolu_1"), sse(anthropic_events(["2."])))
    m = await svc.run("t", p, approve=True)
    assert m.tool_calls[0]["result"] == "2"
    # --no-tools: nothing offered, so the model sees no tools at all
    srv.push(sse(anthropic_events(["No tools here."])))
    m = await svc.run("t", p, tools=False)
    assert "tools" not in srv.last.json and m.tool_calls == []
    # a callable answers like the terminal does; it sees the call
    got = []
    srv.push(tool_turn("toolu_2", 5), sse(anthropic_events(["ok"])))
    m = await svc.run("t", p, approve=lambda info: got.append(info) or "n")
    assert got[0]["name"] == "bump" and got[0]["arguments"] == {"n": 5}
    assert m.tool_calls[0]["result"] == DENIED
    assert await counter(svc) == "[2]"
    await svc.shutdown_kernels()


@pytest.mark.parametrize("how", ["stop", "close"])
async def test_a_stopped_answer_or_closed_server_stores_a_denial(svc, srv, how):
    p = await dialogue_with_bump(svc)
    srv.push(tool_turn("toolu_1"))
    mid = svc.start("t", p, approve="ask")
    async for ev in svc.subscribe(mid):
        if ev.type == "approval":
            break
    if how == "stop":
        await svc.stop(mid)
    else:
        await svc.shutdown_kernels()  # what a closing server does: every run stopped
    with Store(svc.path) as other:
        m = other.get_message(mid)
    assert "pending" not in m.meta
    assert m.tool_calls == [{"id": "toolu_1", "name": "bump", "arguments": {"n": 2},
                             "result": ENDED, "error": True, "denied": True}]
    with pytest.raises(ApprovalError):
        svc.approve(mid, "toolu_1", "once")
    await svc.shutdown_kernels()


KILLED = r'''
import asyncio, os, sys
from dialogue.service import DialogueService
async def main():
    svc = DialogueService(sys.argv[1])
    for m in svc.open("t").messages:  # a fresh kernel: define the tool again
        if m.kind.value == "code":
            await svc.run("t", m.id)
    mid = svc.start("t", sys.argv[2], approve="ask")
    async for ev in svc.subscribe(mid):
        if ev.type == "approval":
            print("pending", flush=True)
            await asyncio.sleep(3600)
asyncio.run(main())
'''


async def test_a_killed_server_leaves_a_denial_on_the_next_open(svc, srv, tmp_path):
    p = await dialogue_with_bump(svc)
    await svc.shutdown_kernels()
    srv.push(tool_turn("toolu_1"))
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(svc.path), p], env=os.environ,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == "pending"
        # while it lives, its pending call is what everyone else sees
        with Store(svc.path) as other:
            assert other.get_message(p).meta["pending"][0]["id"] == "toolu_1"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    deadline = time.monotonic() + 10
    with Store(svc.path) as other:  # every open recovers the dead writer's streams
        m = other.get_message(p)
        while m.meta.get("pending") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            other.recover_interrupted()
            m = other.get_message(p)
    assert m.meta.get("interrupted") and "pending" not in m.meta
    assert m.tool_calls[0]["result"] == ENDED and m.tool_calls[0]["denied"]


# ---------------------------------------------------------------- the policy on its own

class Files:
    """A tool source with a reading tool and a writing one, and a preview for the writer."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def call(self, name: str, arguments: dict) -> tuple[str, bool]:
        self.ran.append(name)
        return "ok", False

    async def preview(self, name: str, arguments: dict) -> dict | None:
        return {"kind": "diff", "text": f"-old\n+{arguments.get('text', '')}"} if name == "write" else None


def files_box() -> tuple[Toolbox, Files]:
    box, src = Toolbox(), Files()
    box.add(src, [ToolSpec("read", reads_only=True, source="dialogue"),
                  ToolSpec("write", source="dialogue")])
    return box, src


async def test_reads_run_changes_ask_and_the_setting_makes_reads_ask():
    box, _ = files_box()
    meta: dict = {}
    events: list[dict] = []
    answers = iter(["once", "deny", "once"])

    def ask(info: dict) -> str:
        events.append(info)
        return next(answers)

    gate = Gate(box, ask, settings=lambda: meta, remember=lambda n: None, event=lambda e: None)
    assert await gate(ToolCall("1", "read", {})) is True
    assert events == []  # a reading tool did not ask
    assert await gate(ToolCall("2", "write", {"text": "new"})) is True
    assert events[0]["preview"] == {"kind": "diff", "text": "-old\n+new"}
    assert await gate(ToolCall("3", "write", {"text": "x"})) == DENIED
    meta = {"approvals": {"ask_reads": True}}
    assert await gate(ToolCall("4", "read", {})) is True
    assert [e["name"] for e in events] == ["write", "write", "read"]


def test_settings_from_a_file_are_data():
    # an imported notebook's odd values count as unset, never as an allow-list
    assert approvals.settings_of({"approvals": {"always": "bump", "ask_reads": "yes"}}) == \
        {"always": [], "ask_reads": False}
    assert approvals.needs_asking(ToolSpec("bump"), {"approvals": {"always": ["bump"]}}) is False
    assert approvals.needs_asking(None, {}) is True
    assert approvals.decision_of(True) == "once" and approvals.decision_of(None) == "deny"
    with pytest.raises(ApprovalError):
        approvals.decision_of("sure")
    assert [approvals.decision_of(x) for x in ("y", "A", " n ", "always")] == \
        ["once", "always", "deny", "always"]
    meta, calls = approvals.settle_pending(
        {"pending": [{"id": "a"}], "x": 1},
        [{"id": "a", "name": "f", "arguments": {}}, {"id": "b", "result": "3", "error": False}])
    assert meta == {"x": 1} and calls[0]["result"] == ENDED and calls[1]["result"] == "3"
    assert json.loads(json.dumps(calls))  # stored as JSON


def test_the_approval_box_escapes_what_the_model_sent():
    from fasthtml.common import to_xml

    from dialogue.web.views import approval_box, tool_calls_html
    bad = "<img src=x onerror=alert(1)>"
    pending = [{"id": "c<1>", "name": f"f{bad}", "arguments": {"x": bad}, "source": "kernel"},
               {"id": "c2", "name": "edit", "arguments": {}, "preview": {"kind": "diff",
                                                                       "text": f"-a\n+{bad}"}},
               {"id": "c3", "name": "run", "arguments": {}, "preview": {"kind": "code",
                                                                      "text": f"print('{bad}')"}}]
    html = to_xml(approval_box("d1", "m1", pending)) + to_xml(tool_calls_html(
        [{"id": "c", "name": bad, "arguments": {"x": bad}, "result": bad, "error": True}]))
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("data-act=\"approve-once\"") == 3
    assert 'class="diff-add"' in html  # an edit shows its diff


def test_python_api_approve_argument(tmp_path, monkeypatch, srv):
    """Dialogue.ask(approve=...): denied by default, a callable answers each call (and 'always'
    is stored), True allows all, tools=False offers none; 'ask' has nobody to answer it here."""
    from dialogue import Dialogue, api
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    try:
        d = Dialogue.create("py", db=tmp_path / "api.db", model="claude-sonnet-4-5")
        d.run(d.add_code(BUMP))
        srv.push(tool_turn("toolu_1", 1), sse(anthropic_events(["no"])))
        m = d.ask("Use &`bump`.")
        assert m.tool_calls[0]["result"] == UNATTENDED
        seen = []
        srv.push(tool_turn("toolu_2", 2), sse(anthropic_events(["2"])))
        m = d.ask("Use &`bump`.", approve=lambda call: seen.append(call["name"]) or "always")
        assert seen == ["bump"] and m.tool_calls[0]["result"] == "2"
        assert d.doc.meta["approvals"]["always"] == ["bump"]
        srv.push(sse(anthropic_events(["none offered"])))
        assert d.ask("Use &`bump`.", tools=False).tool_calls == []
        assert "tools" not in srv.last.json
        with pytest.raises(TypeError):
            d.ask("x", approve="ask")
    finally:
        api.shutdown()


def test_tool_calls_go_into_the_notebook_and_a_file_approves_nothing(svc, tmp_path):
    from dialogue.artifacts import read_notebook, to_ipynb_bytes
    svc.create("t", model="claude-sonnet-4-5")
    p = svc.add("t", "prompt", "Use &`bump`.")
    calls = [{"id": "toolu_1", "name": "bump", "arguments": {"n": 2}, "result": "2", "error": False}]
    svc.store.update_message(p.id, base_version=p.version, response="Done.", tool_calls=calls)
    svc.allow_tool("t", "bump")
    svc.set_approvals("t", ask_reads=True)
    raw = to_ipynb_bytes(svc.for_notebook(svc.open("t")))
    cell = json.loads(raw)["cells"][0]
    assert cell["metadata"]["dialogue"]["tool_calls"] == calls  # exported with the answer
    path = tmp_path / "t.ipynb"
    path.write_bytes(raw)
    back = svc.import_dialogue(read_notebook(path), name="back")
    assert back.messages[0].tool_calls == calls
    assert back.meta["approvals"] == {"always": [], "ask_reads": True}  # only asking more is kept
    assert back.meta["import"]["approvals"] == {"always": ["'bump'"]}
    assert any("ask first" in w for w in back.meta["import"]["warnings"])


def test_tool_calls_replay_as_text_when_no_tools_are_offered():
    from dialogue.context import build
    from dialogue.document import Dialogue, Kind, Message
    done = Message(kind=Kind.prompt, source="Bump it.", response="Total 2.",
                   tool_calls=[{"id": "t1", "name": "bump", "arguments": {"n": 2}, "result": "2",
                                "error": False},
                               {"id": "t2", "name": "bump", "arguments": {"n": 1}}])  # cut off
    now = Message(kind=Kind.prompt, source="What happened?")
    req = build(Dialogue(name="x", model="claude-sonnet-4-5", messages=[done, now]), now.id)
    assert [t.role for t in req.messages] == ["user", "assistant", "user"]
    assert req.messages[1].content == ('[called bump({"n": 2}); result: 2]\n\n[called bump({"n": 1}); '
                                       'result: (no result: the answer ended before this call ran)]'
                                       '\n\nTotal 2.')
    assert len(req.meta["turn_messages"]) == len(req.messages)


async def test_a_request_without_tools_sends_earlier_calls_as_text(svc, srv):
    """A dialogue whose earlier answer called a kernel function (&`bump`): a run with tools off,
    a trial and a replay send no tools, so they send that call as text, never as tool_use and
    tool_result blocks (Anthropic's API refuses those in a request without tools)."""
    p = await dialogue_with_bump(svc)
    srv.push(tool_turn("toolu_1"), sse(anthropic_events(["2."])))
    m = await svc.run("t", p, approve=True)
    assert m.tool_calls[0]["result"] == "2"
    later = svc.add("t", "prompt", "And now?").id

    def sent(body) -> tuple[list[str], bool, bool]:
        blocks = [b["type"] for t in body["messages"] if isinstance(t["content"], list)
                  for b in t["content"] if b["type"] in ("tool_use", "tool_result")]
        texts = [b.get("text", "") for t in body["messages"] for b in (
            t["content"] if isinstance(t["content"], list) else [{"text": t["content"]}])]
        return blocks, "tools" in body, any('[called bump({"n": 2}); result: 2]' in x for x in texts)

    srv.push(sse(anthropic_events(["With tools."])))  # &`bump` is visible: still offered
    await svc.run("t", later, approve=True)
    assert sent(srv.last.json) == (["tool_use", "tool_result"], True, False)
    srv.push(sse(anthropic_events(["Off."])))
    await svc.run("t", later, tools=False)
    assert sent(srv.last.json) == ([], False, True)
    srv.push(sse(anthropic_events(["Tried."])))
    async for _ in svc.trial("t", "A trial?", adapters=None):
        pass
    assert sent(srv.last.json) == ([], False, True)
    srv.push(sse(anthropic_events(["Replayed."])))
    out = await svc.replay("t", later)
    assert not out["error"] and out["replayed"] == "Replayed."
    assert sent(srv.last.json) == ([], False, True)
    await svc.shutdown_kernels()
