"""Kernel functions as tools, and the tool loop driven by a real provider over HTTP.

The provider is the real OpenAIProvider (official `openai` SDK) talking to a local server that
replays a recorded Chat Completions stream with two tool calls (tests/data/recorded/
openai_tool_calls.sse: run_python(code="df.shape", timeout=10) and list_files(path="data/")).
The bundled SmolLM2-135M does not produce usable tool calls, so it cannot drive this loop.
"""
from __future__ import annotations

import json

import pytest
import pytest_asyncio
from servers import ReplayServer, openai_chunks, recorded, sse

from dialogue.kernel import Kernel
from dialogue.llm.base import Done, Request, TextDelta, ToolCall, ToolSpec, Turn, Usage
from dialogue.llm.openai import OpenAIProvider
from dialogue.tools import ToolResult, ToolSchemaError, run_tool, schemas, tool_loop

in_module_loop = pytest.mark.asyncio(loop_scope="module")

TOOLS_CODE = '''
calls = []

class Frame:
    shape = (3, 2)

df = Frame()

def run_python(code: str,  # Python expression to evaluate
               timeout: int = 10,  # seconds allowed
               ) -> str:
    "Evaluate a Python expression in the kernel and return its repr."
    calls.append(("run_python", code, timeout))
    return repr(eval(code))

def list_files(path: str,  # folder to list
               ) -> list:
    "List the files in a folder."
    calls.append(("list_files", path))
    print(f"listing {path}")
    return ["a.csv", "b.csv"]

def explode(n: int) -> int:
    "Always fails."
    return n // 0

async def later(x: int) -> int:
    "An async tool."
    import asyncio
    await asyncio.sleep(0.01)
    return x * 2
'''


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kernel():
    async with Kernel() as k:
        res = await k.run(TOOLS_CODE)
        assert res.ok, res.message
        yield k


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_calls(kernel: Kernel):
    await kernel.run("calls.clear()")
    return kernel


def provider(srv: ReplayServer) -> OpenAIProvider:
    return OpenAIProvider(f"openai-compatible:{srv.openai_base_url}/gpt-4.1-mini")


async def offered(kernel: Kernel, *names: str) -> Request:
    return Request(model="gpt-4.1-mini", system="S",
                   messages=[Turn(role="user", content="What shape is df, and what is in data/?")],
                   tools=await schemas(kernel, list(names)))


# ---------------------------------------------------------------- schemas and calls

@in_module_loop
async def test_schema_is_computed_in_the_kernel(kernel: Kernel):
    specs = await schemas(kernel, ["run_python", "list_files"])
    assert specs[0] == ToolSpec(
        name="run_python",
        description="Evaluate a Python expression in the kernel and return its repr.\n\nReturns:\n- type: string",
        parameters={"type": "object", "required": ["code"], "properties": {
            "code": {"description": "Python expression to evaluate", "type": "string"},
            "timeout": {"description": "seconds allowed", "default": 10, "type": "integer"}}},
        source="kernel")  # a kernel function may change anything: not reads_only
    assert specs[1].parameters["required"] == ["path"]
    with pytest.raises(ToolSchemaError, match="calls is not a function"):
        await schemas(kernel, ["calls"])


@in_module_loop
async def test_run_tool_results_and_errors(fresh_calls: Kernel):
    k = fresh_calls
    assert await run_tool(k, "list_files", {"path": "x/"}) == ("listing x/\n['a.csv', 'b.csv']", False)
    assert await run_tool(k, "later", {"x": 21}) == ("42", False)
    text, err = await run_tool(k, "explode", {"n": 1})
    assert err and text.startswith("Traceback") and "ZeroDivisionError: integer division or modulo by zero" in text
    # only the user's frames: not those of kernel/inside/tools.py (named by its real file)
    assert "_dialogue" not in text and "kernel/inside" not in text and "fastcore" not in text
    text, err = await run_tool(k, "run_python", {"code": "__import__('time').sleep(30)"}, timeout=1)
    assert err and "did not finish" in text
    assert await run_tool(k, "run_python", {"code": "1 + 1"}) == ("2", False)  # the kernel lives on
    # what a tool prints reaches the model as a page shows it: the progress bar's last state
    assert await run_tool(k, "run_python", {"code": "print(' 50%\\r\\x1b[32m100%\\x1b[0m') or 7"}) == \
        ("100%\n7", False)
    assert (await k.eval("len(calls)")) == "4"  # list_files, the run_python that timed out, 1 + 1, 7


# ---------------------------------------------------------------- the loop, over HTTP

@in_module_loop
async def test_tool_loop_runs_calls_and_sends_results_back(fresh_calls: Kernel):
    k = fresh_calls
    with ReplayServer() as srv:
        srv.push(recorded("openai_tool_calls.sse"),
                 sse(openai_chunks(["df has shape (3, 2); data/ holds a.csv and b.csv."])))
        req = await offered(k, "run_python", "list_files")
        events = [ev async for ev in tool_loop(provider(srv), req, k)]

        kinds = [type(ev).__name__ for ev in events]
        assert kinds == ["ToolCall", "ToolCall", "Usage", "ToolResult", "ToolResult",
                         "TextDelta", "Usage", "Done"]
        results = [ev for ev in events if isinstance(ev, ToolResult)]
        assert results == [
            ToolResult(id="call_Xq8L3mVn2pR7tY1wZ5aB9cD0", name="run_python",
                       arguments={"code": "df.shape", "timeout": 10}, result="(3, 2)"),
            ToolResult(id="call_Bv4N9sQk1mT6yH8xW2eJ7rL3", name="list_files",
                       arguments={"path": "data/"}, result="listing data/\n['a.csv', 'b.csv']"),
        ]
        assert events[-1] == Done("end")
        assert await k.eval("calls") == "[('run_python', 'df.shape', 10), ('list_files', 'data/')]"

        # What the model got back in the second request: its calls, then one tool message each.
        assert len(srv.requests) == 2
        msgs = srv.requests[1].json["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "tool"]
        assert [c["function"]["name"] for c in msgs[2]["tool_calls"]] == ["run_python", "list_files"]
        assert json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"]) == {"code": "df.shape", "timeout": 10}
        assert msgs[3] == {"role": "tool", "tool_call_id": "call_Xq8L3mVn2pR7tY1wZ5aB9cD0", "content": "(3, 2)"}
        assert msgs[4]["content"] == "listing data/\n['a.csv', 'b.csv']"
        assert [t["function"]["name"] for t in srv.requests[1].json["tools"]] == ["run_python", "list_files"]
        # the caller's request is untouched
        assert len(req.messages) == 1
        # every result can be kept on the response message
        assert results[0].to_dict()["type"] == "tool_result"


@in_module_loop
async def test_a_tool_not_offered_is_refused_and_not_run(fresh_calls: Kernel):
    k = fresh_calls
    with ReplayServer() as srv:
        srv.push(recorded("openai_tool_calls.sse"), sse(openai_chunks(["ok"])))
        req = await offered(k, "run_python")  # list_files exists in the kernel but is not offered
        events = [ev async for ev in tool_loop(provider(srv), req, k)]
    refused = [ev for ev in events if isinstance(ev, ToolResult) and ev.name == "list_files"]
    assert len(refused) == 1 and refused[0].error
    assert "no tool named 'list_files'" in refused[0].result and "run_python" in refused[0].result
    assert await k.eval("[c[0] for c in calls]") == "['run_python']"


@in_module_loop
async def test_approval_can_deny_a_call(fresh_calls: Kernel):
    k = fresh_calls
    asked: list[str] = []

    async def approve(call: ToolCall) -> bool:
        asked.append(call.name)
        return call.name != "list_files"

    with ReplayServer() as srv:
        srv.push(recorded("openai_tool_calls.sse"), sse(openai_chunks(["ok"])))
        req = await offered(k, "run_python", "list_files")
        events = [ev async for ev in tool_loop(provider(srv), req, k, approve=approve)]
        sent_back = srv.requests[1].json["messages"][-1]
    assert asked == ["run_python", "list_files"]
    denied = next(ev for ev in events if isinstance(ev, ToolResult) and ev.name == "list_files")
    assert denied.error and denied.result == "denied by the user"
    assert sent_back["content"] == "denied by the user"
    assert await k.eval("[c[0] for c in calls]") == "['run_python']"


@in_module_loop
async def test_step_limit(fresh_calls: Kernel):
    k = fresh_calls
    again = openai_chunks(tool_calls=[("call_2", "run_python", {"code": "2 * 21"})])
    with ReplayServer() as srv:
        srv.push(recorded("openai_tool_calls.sse"), sse(again))
        req = await offered(k, "run_python", "list_files")
        events = [ev async for ev in tool_loop(provider(srv), req, k, max_steps=1)]
        assert len(srv.requests) == 2  # no third call to the model
    last = [ev for ev in events if isinstance(ev, ToolResult)][-1]
    assert last.id == "call_2" and last.error and "limit of 1 rounds" in last.result
    assert events[-1] == Done("max_steps")
    assert await k.eval("len(calls)") == "2"  # the call over the limit did not run


@in_module_loop
async def test_unusable_arguments_go_back_to_the_model(fresh_calls: Kernel):
    k = fresh_calls
    broken = openai_chunks(tool_calls=[("call_b", "run_python", '{"code": "1 +')])
    with ReplayServer() as srv:
        srv.push(sse(broken), sse(openai_chunks(["sorry"])))
        req = await offered(k, "run_python")
        events = [ev async for ev in tool_loop(provider(srv), req, k)]
        back = srv.requests[1].json["messages"][-1]
    res = next(ev for ev in events if isinstance(ev, ToolResult))
    assert res.error and "not valid JSON" in res.result and back["content"] == res.result
    assert isinstance(events[-2], Usage) and events[-1] == Done("end")
    assert any(isinstance(ev, TextDelta) and ev.text == "sorry" for ev in events)
    assert await k.eval("calls") == "[]"


@in_module_loop
async def test_a_prefill_begins_the_first_round_only(fresh_calls: Kernel):
    """The answer's prefill is sent once, as the start of the first round; after a tool call it
    is part of that round's assistant turn, and the next round continues after the results
    (re-sending it would make the model start its answer over, and call the tool again)."""
    k = fresh_calls
    with ReplayServer() as srv:
        srv.push(recorded("openai_tool_calls.sse"), sse(openai_chunks(["Done."])))
        req = await offered(k, "run_python", "list_files")
        req.prefill = "Let me look."
        events = [ev async for ev in tool_loop(provider(srv), req, k)]
        assert events[-1] == Done("end")
        first, second = (r.json["messages"] for r in srv.requests)
        assert first[-1] == {"role": "assistant", "content": "Let me look."}
        assert [m["role"] for m in second] == ["system", "user", "assistant", "tool", "tool"]
        assert second[2]["content"].startswith("Let me look.") and second[2]["tool_calls"]
        assert req.prefill == "Let me look."  # the caller's request is untouched
