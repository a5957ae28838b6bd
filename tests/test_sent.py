"""What was sent: the request recorded with each answer (`dialogue.sent`, `Store.save_request`),
and the estimate a prompt shows before it is sent. Real SQLite files, the Anthropic SDK against
the local replay server, the bundled local model with its disk KV cache."""
from __future__ import annotations

import json
import time

import pytest

from dialogue import sent
from dialogue.context import Resolved, build, estimate_tokens
from dialogue.document import Dialogue, Kind, Message
from dialogue.llm.base import ToolSpec
from dialogue.service import DialogueService, NotFoundError
from dialogue.store import Store
from servers import ReplayServer, anthropic_events, sse

LOG = "\n".join(f"line {i}" for i in range(200))


def _dialogue() -> Dialogue:
    return Dialogue(name="r", model="claude-sonnet-4-5", system="Be exact.", messages=[
        Message(id="old1", kind=Kind.note, source="an old note " + "x" * 400),
        Message(id="hid1", kind=Kind.note, source="the secret plan", hidden=True),
        Message(id="pin1", kind=Kind.note, source="pinned rule: answer in English", pinned=True),
        Message(id="code1", kind=Kind.code, source="print(log)",
                outputs=[{"output_type": "stream", "name": "stdout", "text": LOG}]),
        Message(id="p1", kind=Kind.prompt, source="first question", response="first answer"),
        Message(id="p2", kind=Kind.prompt, source="Use &`add` on 2 and 3."),
    ])


def test_record_lists_hidden_dropped_cut_and_tools():
    d = _dialogue()
    full = build(d, "p2", resolved=Resolved(tools=[ToolSpec("add", "Add two numbers.")]))
    # a budget that leaves room for everything but the oldest note
    req = build(d, "p2", resolved=Resolved(tools=[ToolSpec("add", "Add two numbers.")]),
                budget=full.meta["tokens"] - 10)
    rec = sent.record(req)
    sent_text = json.dumps(rec["turns"])
    assert "the secret plan" not in sent_text and "an old note" not in sent_text
    status = {e["id"]: e for e in rec["messages"]}
    assert status["hid1"]["status"] == "hidden" and "hidden" in status["hid1"]["reason"]
    assert status["old1"]["status"] == "dropped" and "budget" in status["old1"]["reason"]
    assert status["old1"]["tokens"] > 100 and rec["dropped"] == 1
    assert status["pin1"] == {"id": "pin1", "kind": "note", "status": "sent",
                              "tokens": status["pin1"]["tokens"], "pinned": True}
    cut = status["code1"]["cut"]
    assert cut["lines"] == 200 and cut["cut_lines"] == 200 - cut["kept_lines"] > 0
    assert "line 199" in sent_text and "line 100\n" not in sent_text  # head and tail only
    assert status["p2"]["prompt"] is True
    assert [t["name"] for t in rec["tools"]] == ["add"] and rec["tools_tokens"] > 0
    # each turn says which messages it was made of; the answer is its prompt's
    assert [(t["role"], t["messages"]) for t in rec["turns"]] == [
        ("user", ["pin1", "code1", "p1"]), ("assistant", ["p1"]), ("user", ["p2"])]
    assert rec["cache"]["turns"] == [1]  # the builder's breakpoint (no provider given)
    assert rec["model"] == "claude-sonnet-4-5" and rec["max_tokens"] == 1024
    parts = rec["system"]["tokens"] + rec["context"]["tokens"] + rec["tools_tokens"] + \
        sum(e.get("tokens", 0) for e in rec["messages"] if e["status"] == "sent")
    assert parts == rec["tokens"]  # the parts add up to what was counted
    # per turn: the user turns their messages' own parts, the answer its own tokens
    by_turn = sent.turn_tokens(rec)
    assert by_turn[1] == status["p1"]["answer_tokens"] == estimate_tokens("first answer")
    assert sum(by_turn) + rec["system"]["tokens"] + rec["context"]["tokens"] + \
        rec["tools_tokens"] == rec["tokens"]


def test_records_round_trip_and_share_their_long_texts(tmp_path):
    d = _dialogue()
    with Store(tmp_path / "s.db") as st:
        r1 = sent.record(build(d, "p2", resolved=Resolved(tools=[ToolSpec("add")])))
        st.save_request("p2", 3, r1)
        blobs = st._one("SELECT count(*) FROM blobs")[0]
        # the one long text (the first user turn), a node per turn and per listed message
        assert blobs == 1 + 3 + 6
        back = st.request_record("p2")
        assert back == {**r1, "answer_version": 3}
        assert st.request_record("p2", 3) == back and st.request_record("p2", 4) is None
        assert st.request_record("p1") is None
        # a later request repeats the turns before it: they are stored once
        d.messages.append(Message(id="p3", kind=Kind.prompt, source="next"))
        d.messages[-2].response = "second answer"
        r2 = sent.record(build(d, "p3", resolved=Resolved(tools=[ToolSpec("add")])))
        st.save_request("p3", 2, r2)
        assert st.request_record("p3")["turns"] == r2["turns"]
        stored = st._one("SELECT record FROM requests WHERE message_id = 'p3'")[0]
        assert "line 199" not in stored  # the long turn is a hash here
        # the turns it repeats are shared: new are the two turns after them, the listing's
        # changed p2 entry (no longer the prompt) and p3's
        assert st._one("SELECT count(*) FROM blobs")[0] == blobs + 2 + 2
        assert st.request_record("p2")["turns"] == r1["turns"]  # the older record unchanged


@pytest.fixture
async def svc(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    s = DialogueService(tmp_path / "sent.db")
    yield s
    await s.aclose()


@pytest.fixture
def claude(monkeypatch):
    """The replay server speaking the Messages API, as Claude for this test's service."""
    with ReplayServer() as srv:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        yield srv


async def _answer(svc, name, mid, **kw):
    mid = svc.start(name, mid, **kw)
    events = [ev async for ev in svc.subscribe(mid)]
    assert events[-1].type == "done"
    return events[-1].data


async def test_a_claude_answer_keeps_the_request_it_sent(svc, claude):
    svc.create("c", model="claude-sonnet-4-5", system="Be exact.")
    svc.update("c", meta={"max_tokens": 300})
    svc.add("c", "note", "visible note")
    h = svc.add("c", "note", "the secret plan")
    svc.set_flags("c", h.id, hidden=True)
    p1 = svc.add("c", "prompt", "first?")
    claude.push(sse(anthropic_events(["one"])), sse(anthropic_events(["two"])))
    await _answer(svc, "c", p1.id)
    p2 = svc.add("c", "prompt", "second?")
    final = await _answer(svc, "c", p2.id)
    body = claude.last.json
    rec = svc.sent_request("c", p2.id)
    assert rec["message"] == p2.id and rec["answer_version"] == final.version
    assert rec["model"] == body["model"] and rec["max_tokens"] == body["max_tokens"] == 300
    assert rec["system"]["text"] == body["system"][0]["text"] == "Be exact."
    # every turn exactly as the API received it
    assert [(t["role"], [p["text"] for p in t["parts"]]) for t in rec["turns"]] == [
        (m["role"], [b["text"] for b in m["content"]] if isinstance(m["content"], list)
         else [m["content"]]) for m in body["messages"]]
    # the breakpoints are where the body carries cache_control
    marked = [i for i, m in enumerate(body["messages"]) if isinstance(m["content"], list)
              and any("cache_control" in b for b in m["content"])]
    assert rec["cache"]["turns"] == marked
    assert {"at": "system", "about": "after the system prompt and attached context"} in \
        rec["cache"]["breakpoints"] and "cache_control" in body["system"][-1]
    assert [e["status"] for e in rec["messages"]] == ["sent", "hidden", "sent", "sent"]
    # the first answer's request is its own; an older version has none; a note has none
    assert [t["role"] for t in svc.sent_request("c", p1.id)["turns"]] == ["user"]
    with pytest.raises(NotFoundError, match="no request is recorded"):
        svc.sent_request("c", p2.id, version=1)
    with pytest.raises(NotFoundError, match="only a prompt"):
        svc.sent_request("c", h.id)


async def test_claude_estimate_counts_the_cached_prefix_only_when_it_can_match(svc, claude):
    svc.create("e", model="claude-sonnet-4-5")
    n = svc.add("e", "note", "some notes " * 50)
    p1 = svc.add("e", "prompt", "first?")
    first = await svc.estimate("e", p1.id)
    assert first["cached"] == 0 and "no earlier answer" in first["label"]
    assert first["tokens"] > 100 and first["exact"] is False and first["label"].startswith("~")
    claude.push(sse(anthropic_events(["one"], usage={"input_tokens": 3,
                                                     "cache_creation_input_tokens": 140})))
    await _answer(svc, "e", p1.id)
    p2 = svc.add("e", "prompt", "second?")
    est = await svc.estimate("e", p2.id)
    assert est["cached"] == 143 and "written by the last answer" in est["cached_label"]
    assert est["tokens"] >= est["cached"]
    # the text being typed counts, not the stored one
    longer = await svc.estimate("e", p2.id, source="second? " + "more words " * 100)
    assert longer["tokens"] > est["tokens"] + 200
    # an edit above the last answer: the cached prefix no longer matches
    svc.edit("e", n.id, base_version=None, source="changed notes")
    changed = await svc.estimate("e", p2.id)
    assert changed["cached"] == 0 and "changed above" in changed["cached_label"]
    # an old answer's cache has expired
    later = sent.estimate(*(await _req(svc, "e", p2.id)), now=time.time() + 3600)
    assert later["cached"] == 0


async def _req(svc, name, mid):
    """(request, provider) as the estimate builds them, for checking the expiry without waiting."""
    from dialogue.llm.base import get_provider
    d = svc.open(name)
    provider = get_provider(d.model)
    _, req = await svc._runs.request(d, d.message(mid), provider, None, estimate=True)
    return (req,)


async def test_estimate_never_evaluates_references(svc, tmp_path):
    svc.create("refs", model="claude-sonnet-4-5")
    p = svc.add("refs", "prompt", f"What does !`touch {tmp_path / 'made'}` print, and $`x`?")
    est = await svc.estimate("refs", p.id)
    assert "(+ the values of 2 references)" in est["label"]
    assert not (tmp_path / "made").exists() and svc.kernel_status("refs") != "idle"
    with pytest.raises(NotFoundError):
        await svc.estimate("refs", svc.add("refs", "note", "n").id)


async def test_local_estimate_uses_the_models_tokenizer_and_disk_cache(svc, tmp_path, monkeypatch):
    from dialogue.llm.base import get_provider
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    svc.create("loc", model="local:default", system="Answer briefly.")
    svc.update("loc", meta={"max_tokens": 16})
    p1 = svc.add("loc", "prompt", "What is the capital of France?")
    get_provider("local:default").runtime.close()  # not loaded: nothing is loaded to estimate
    cold = await svc.estimate("loc", p1.id)
    assert cold["cached"] is None and "unknown until the model is loaded" in cold["label"]
    assert not get_provider("local:default").runtime.alive
    await _answer(svc, "loc", p1.id)
    p2 = svc.add("loc", "prompt", "And of Italy?")
    est = await svc.estimate("loc", p2.id)
    assert est["exact"] is True and "KV cache on disk" in est["cached_label"]
    assert 0 < est["cached"] < est["tokens"]
    final = await _answer(svc, "loc", p2.id)
    u = final.usage
    assert est["tokens"] == u["input"] + u["cache_read"] + u["cache_write"]  # the prompt it sent
    assert est["cached"] <= u["cache_read"]
    rec = svc.sent_request("loc", p2.id)
    assert rec["cache"]["kind"] == "local" and rec["token_count"] == "tokenizer"


async def test_the_record_lists_folder_notes_attached_docs_and_the_mode(svc, claude):
    from dialogue.api import Dialogue as Handle
    svc.new_folder("team")
    svc.set_folder("team", note="Team rule: answer in French.")
    svc.create("ctx", model="claude-sonnet-4-5", folder="team")
    svc.attach("ctx", "glossary", "chat = cat\n" * 20)
    svc.set_mode("ctx", "concise")
    p = svc.add("ctx", "prompt", "What is a chat?")
    claude.push(sse(anthropic_events(["Un chat."])))
    await _answer(svc, "ctx", p.id)
    body = claude.last.json
    handle = Handle(svc.dialogue_id("ctx"), db=svc.path)  # the Python API
    rec = handle.request(p.id)
    later = handle.add_prompt("And a dog?")
    est = handle.estimate(later.id)
    assert est["tokens"] > rec["tokens"] and "Claude's prompt cache" in est["cached_label"]
    entries = rec["context"]["entries"]
    assert [(e["kind"], e["name"]) for e in entries] == [("folder", "team"), ("text", "glossary")]
    assert all(e["tokens"] > 0 for e in entries)
    assert rec["context"]["text"] == body["system"][1]["text"]  # the context block as sent
    assert rec["context"]["tokens"] >= sum(e["tokens"] for e in entries)
    assert rec["mode"]["name"] == "concise" and rec["system"]["text"] == body["system"][0]["text"]


async def test_tools_the_run_adds_are_listed_and_counted(svc, claude):
    svc.create("tl", model="claude-sonnet-4-5")
    svc.set_doc_tools("tl", "read")
    p = svc.add("tl", "prompt", "What is in this dialogue?")
    est = await svc.estimate("tl", p.id)
    claude.push(sse(anthropic_events(["Nothing much."])))
    await _answer(svc, "tl", p.id)
    body = claude.last.json
    rec = svc.sent_request("tl", p.id)
    assert [t["name"] for t in rec["tools"]] == [t["name"] for t in body["tools"]] != []
    assert rec["tools_tokens"] > 50  # the document tools' schemas, counted where they were added
    assert rec["tokens"] == rec["system"]["tokens"] + rec["tools_tokens"] + rec["prompt_tokens"]
    assert est["tokens"] == rec["tokens"]  # the estimate offered the same tools


def test_estimate_says_what_was_left_out_and_when_it_will_not_fit():
    from types import SimpleNamespace
    d = _dialogue()
    tools = Resolved(tools=[ToolSpec("add")])
    full = build(d, "p2", resolved=tools)
    req = build(d, "p2", resolved=tools, budget=full.meta["tokens"] - 10, max_tokens=50)
    window = SimpleNamespace(context_window=full.meta["tokens"] + 60, count_tokens=lambda t: None)
    fits = sent.estimate(req, provider=window)
    assert fits["dropped"] == 1 and "1 earlier message left out to fit" in fits["label"]
    assert fits["over"] is False and "over the model's context" not in fits["label"]
    tight = SimpleNamespace(context_window=req.meta["tokens"] + 10, count_tokens=lambda t: None)
    over = sent.estimate(req, provider=tight)
    assert over["over"] is True and f"over the model's context of {req.meta['tokens'] + 10:,}" in over["label"]


async def test_tool_calls_and_results_replayed_as_turns_are_shown(svc, claude):
    from dialogue.service import turn_text, turn_title
    svc.create("tc", model="claude-sonnet-4-5")
    code = svc.add("tc", "code", 'def add(a: int, b: int) -> int:\n    "Add two numbers."\n    return a + b')
    await svc.run("tc", code.id)
    p1 = svc.add("tc", "prompt", "Add 2 and 3 with &`add`.")
    claude.push(sse(anthropic_events(tool_uses=[("toolu_1", "add", {"a": 2, "b": 3})])),
                sse(anthropic_events(["It is 5."])))
    await _answer(svc, "tc", p1.id, approve=True)
    p2 = svc.add("tc", "prompt", "Thanks.")
    claude.push(sse(anthropic_events(["You're welcome."])))
    await _answer(svc, "tc", p2.id, approve=True)
    rec = svc.sent_request("tc", p2.id)
    roles = [t["role"] for t in rec["turns"]]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "user"
    call, result = rec["turns"][1], rec["turns"][2]
    assert turn_text(call) == '-> add {"a": 2, "b": 3}'
    assert turn_title(3, result) == f"turn 3: tool result of add ({p1.id})"
    assert turn_text(result) == "5"
    assert [t["name"] for t in rec["tools"]] == ["add"]


async def test_a_forks_copy_shows_the_request_its_answer_was_sent_with(svc, claude):
    svc.create("orig", model="claude-sonnet-4-5")
    p = svc.add("orig", "prompt", "first?")
    claude.push(sse(anthropic_events(["one"])), sse(anthropic_events(["two"])))
    await _answer(svc, "orig", p.id)
    sent_then = svc.sent_request("orig", p.id)
    fork = svc.fork("orig", p.id, name="branch")
    copy = svc.messages(fork.id)[-1]
    time.sleep(0.01)
    svc.edit("orig", p.id, base_version=None, source="first, changed?")
    await _answer(svc, "orig", p.id)  # the original answered again, after the fork
    got = svc.sent_request("branch", copy.id)
    assert got["copied_from"] == p.id and got["answer_version"] == sent_then["answer_version"]
    assert got["turns"] == sent_then["turns"] != svc.sent_request("orig", p.id)["turns"]
