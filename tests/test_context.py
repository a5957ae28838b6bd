"""Building the model's request from a dialogue."""
from __future__ import annotations

import base64
import json
import math

import pytest
import pytest_asyncio

from dialogue.context import (
    DEFAULT_SYSTEM, ContextError, OutputLimit, Refs, build, build_async, cut_text, estimate_tokens,
    parse_output_limit, references, terminal_text, with_output_limit,
)
from dialogue.document import ContextItem, Dialogue, Kind, Message
from dialogue.kernel import Kernel
from dialogue.llm.base import Part, Request, ToolSpec, Turn
from dialogue.tools import ToolSchemaError

# Tests that use the kernel share it, and so its event loop.
in_module_loop = pytest.mark.asyncio(loop_scope="module")

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kernel():
    async with Kernel() as k:
        yield k


def small_dialogue() -> Dialogue:
    return Dialogue(
        name="golden", id="d1", model="claude-sonnet-4-5", system="Be brief.",
        context=[ContextItem(name="fastcore.L", content="L is a list.", source="https://fastcore.fast.ai")],
        messages=[
            Message(id="n1", kind=Kind.note, source="# Exploring L"),
            Message(id="c1", kind=Kind.code, source="from fastcore.foundation import L\nL(1,2)",
                    execution_count=1,
                    outputs=[{"output_type": "execute_result", "execution_count": 1,
                              "data": {"text/plain": "(#2) [1,2]"}, "metadata": {}}]),
            Message(id="p1", kind=Kind.prompt, source="What is L?", response="A list with extras."),
            Message(id="h1", kind=Kind.note, source="secret", hidden=True),
            Message(id="c2", kind=Kind.code, source="print('hi')\n1/0", outputs=[
                {"output_type": "stream", "name": "stdout", "text": "hi\n"},
                {"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero",
                 "traceback": ["\x1b[31mZeroDivisionError\x1b[39m: division by zero"]}]),
            Message(id="p2", kind=Kind.prompt, source="Why the error?"),
        ])


# ---------------------------------------------------------------- golden

def test_golden_request():
    req = build(small_dialogue(), "p2")
    assert req == Request(
        model="claude-sonnet-4-5",
        system="Be brief.",
        context='<context name="fastcore.L" source="https://fastcore.fast.ai">\nL is a list.\n</context>',
        messages=[
            Turn(role="user", content=(
                "# Exploring L\n\n"
                "```python\nfrom fastcore.foundation import L\nL(1,2)\n```\n\n"
                "Output:\n```\n(#2) [1,2]\n```\n\n"
                "What is L?")),
            Turn(role="assistant", content="A list with extras.", cache=True),
            Turn(role="user", content=(
                "```python\nprint('hi')\n1/0\n```\n\n"
                "Output:\n```\nhi\nZeroDivisionError: division by zero\n```\n\n"
                "Why the error?")),
        ],
        tools=[], max_tokens=1024, dropped=0,
        meta={"upto": "p2", "tokens": 84, "token_count": "estimate (~4 characters per token)",
              "refs": "", "ref_errors": [], "cut": [],
              "mode": {"name": "standard", "chars": 0},
              "context": [{"kind": "text", "name": "fastcore.L", "source": "https://fastcore.fast.ai",
                           "tokens": 3}],
              "tokens_by_part": {"system": 3, "context": 22, "prompt": 4, "tools": 0},
              "turn_messages": [["n1", "c1", "p1"], ["p1"], ["c2", "p2"]],
              "messages": [
                  {"id": "n1", "kind": "note", "status": "sent", "tokens": 4, "pinned": False},
                  {"id": "c1", "kind": "code", "status": "sent", "tokens": 21, "pinned": False},
                  {"id": "p1", "kind": "prompt", "status": "sent", "tokens": 8, "pinned": False,
                   "answer_tokens": 5},
                  {"id": "h1", "kind": "note", "status": "hidden",
                   "reason": "hidden from the model by the user"},
                  {"id": "c2", "kind": "code", "status": "sent", "tokens": 22, "pinned": False},
                  {"id": "p2", "kind": "prompt", "status": "sent", "tokens": 4, "prompt": True}]},
    )


def test_estimate_is_four_characters_a_token():
    req = build(small_dialogue(), "p2")
    pieces = ["Be brief.", req.context, "# Exploring L",
              "```python\nfrom fastcore.foundation import L\nL(1,2)\n```", "Output:\n```\n(#2) [1,2]\n```",
              "What is L?", "A list with extras.", "```python\nprint('hi')\n1/0\n```",
              "Output:\n```\nhi\nZeroDivisionError: division by zero\n```", "Why the error?"]
    assert req.meta["tokens"] == sum(math.ceil(len(p) / 4) for p in pieces)
    assert estimate_tokens("abcde") == 2


# ---------------------------------------------------------------- shape

def test_hidden_messages_are_left_out():
    d = Dialogue(name="h", messages=[
        Message(kind=Kind.note, source="visible note"),
        Message(kind=Kind.prompt, source="hidden question", response="hidden answer", hidden=True),
        Message(kind=Kind.code, source="hidden_code = 1", hidden=True),
        Message(id="p", kind=Kind.prompt, source="question"),
    ])
    req = build(d, "p")
    # what the model sees; the request's meta lists the hidden messages by id, for the user
    text = json.dumps({k: v for k, v in req.to_dict().items() if k != "meta"})
    assert "visible note" in text
    assert "hidden" not in text
    assert [e["status"] for e in req.meta["messages"]] == ["sent", "hidden", "hidden", "sent"]
    assert [t.role for t in req.messages] == ["user"]


def test_turns_alternate_and_unanswered_prompts_merge_forward():
    d = Dialogue(name="a", messages=[
        Message(kind=Kind.prompt, source="q1", response="a1"),
        Message(kind=Kind.prompt, source="q2 (never answered)"),
        Message(kind=Kind.note, source="a note"),
        Message(kind=Kind.prompt, source="q3", response="a3"),
        Message(kind=Kind.code, source="x = 1"),
        Message(kind=Kind.note, source="  "),  # empty: contributes nothing
        Message(id="p", kind=Kind.prompt, source="q4"),
        Message(kind=Kind.note, source="below the prompt: never seen"),
    ])
    req = build(d, "p", system="")
    assert [t.role for t in req.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert req.messages[2].content == "q2 (never answered)\n\na note\n\nq3"
    assert req.messages[4].content == "```python\nx = 1\n```\n\nq4"
    assert [t.cache for t in req.messages] == [False, False, False, True, False]
    assert "below the prompt" not in json.dumps(req.to_dict())
    assert req.system == ""  # an explicit empty system prompt is respected


def test_default_system_prompt_when_the_dialogue_has_none():
    d = Dialogue(name="s", messages=[Message(id="p", kind=Kind.prompt, source="hi")])
    assert build(d, "p").system == DEFAULT_SYSTEM
    d.system = "Mine."
    assert build(d, "p").system == "Mine."


def test_images_are_image_parts_or_a_mention():
    d = Dialogue(name="i", messages=[
        Message(kind=Kind.code, source="plot()", outputs=[
            {"output_type": "stream", "name": "stdout", "text": "drawing\n"},
            {"output_type": "display_data", "metadata": {},
             "data": {"image/png": PNG + "\n", "text/plain": "<Figure size 640x480 with 1 Axes>"}},
            {"output_type": "display_data", "metadata": {},
             "data": {"text/html": "<b>table</b>", "text/plain": "<IPython.core.display.HTML object>"}}]),
        Message(kind=Kind.note, source="see the picture", attachments={"pic.png": {"image/png": PNG}}),
        Message(id="p", kind=Kind.prompt, source="describe"),
    ])
    (turn,) = build(d, "p").messages
    assert turn.content == [
        Part(text="```python\nplot()\n```\n\nOutput:\n```\ndrawing\n```"),
        Part(type="image", mime="image/png", data=PNG),
        Part(text="```\n<b>table</b>\n```\n\nsee the picture"),
        Part(type="image", mime="image/png", data=PNG),
        Part(text="describe"),
    ]
    (turn,) = build(d, "p", images=False).messages
    assert turn.content == ("```python\nplot()\n```\n\nOutput:\n```\ndrawing\n"
                            "<Figure size 640x480 with 1 Axes>\n<b>table</b>\n```\n\n"
                            "see the picture\n\n[attached image pic.png]\n\ndescribe")


def test_long_outputs_keep_head_and_tail():
    d = Dialogue(name="l", messages=[
        Message(kind=Kind.code, source="spam()", outputs=[
            {"output_type": "stream", "name": "stdout", "text": "".join(f"line {i}\n" for i in range(10_000))}]),
        Message(id="p", kind=Kind.prompt, source="?"),
    ])
    text = build(d, "p", output_limit={"chars": 300}).messages[0].text()
    assert "line 0\n" in text and "line 9999" in text and "lines (" in text and "characters) cut" in text
    assert len(text) < 500


def test_bad_upto_is_a_clear_error():
    d = small_dialogue()
    with pytest.raises(ContextError, match="no message 'nope'"):
        build(d, "nope")
    with pytest.raises(ContextError, match="is a code message"):
        build(d, "c1")
    with pytest.raises(ContextError, match="budget"):
        build(d, "p2", budget=0)


# ---------------------------------------------------------------- budget

def long_dialogue() -> Dialogue:
    msgs = []
    for i in range(6):
        msgs.append(Message(id=f"n{i}", kind=Kind.note, source=f"note {i} " + "word " * 100,
                            pinned=(i == 1)))
        msgs.append(Message(id=f"q{i}", kind=Kind.prompt, source=f"question {i}", response=f"answer {i}"))
    msgs.append(Message(id="p", kind=Kind.prompt, source="final question"))
    return Dialogue(name="long", system="S", messages=msgs)


def test_over_budget_drops_the_oldest_unpinned_first():
    d = long_dialogue()
    full = build(d, "p")
    assert full.dropped == 0
    budget = full.meta["tokens"] - 300  # about three notes too many
    req = build(d, "p", budget=budget)
    assert req.meta["tokens"] <= budget
    assert req.dropped >= 3
    text = json.dumps(req.to_dict())
    assert "note 0 " not in text and "question 0" not in text  # the oldest went first
    assert "note 1 " in text  # pinned: kept although old
    assert "note 5 " in text and "final question" in text  # the newest stay
    # Only as many as needed: with the whole dialogue's count as the budget, nothing goes.
    assert build(d, "p", budget=full.meta["tokens"]).dropped == 0
    with pytest.raises(ContextError, match="over the budget of 50"):
        build(d, "p", budget=50)  # the pinned note and the prompt alone are more


def test_tokens_from_the_local_models_tokenizer():
    llama_cpp = pytest.importorskip("llama_cpp")
    from dialogue.gguf.models import bundled_model_path

    llm = llama_cpp.Llama(model_path=str(bundled_model_path()), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode(), add_bos=False, special=False))

    d = long_dialogue()
    req = build(d, "p", count_tokens=count)
    assert req.meta["token_count"] == "tokenizer"
    assert req.meta["tokens"] != build(d, "p").meta["tokens"]
    budget = req.meta["tokens"] - 200
    trimmed = build(d, "p", count_tokens=count, budget=budget)
    assert trimmed.dropped > 0 and trimmed.meta["tokens"] <= budget
    # A provider without a tokenizer returns None: the estimate is used, and said.
    req = build(d, "p", count_tokens=lambda text: None)
    assert req.meta["token_count"].startswith("estimate")
    assert req.meta["tokens"] == build(d, "p").meta["tokens"]


# ---------------------------------------------------------------- references

def test_references_are_parsed_like_solveit():
    refs = references("Compare $`df.shape` and $`len(xs)`, see !`ls -1 data`, use &`search` "
                      "and &`[fetch, search , parse]`; $`df.shape` again.\n"
                      "```\nnot a ref: $`inside_fence`\n```\n")
    assert refs == Refs(exprs=["df.shape", "len(xs)"], cmds=["ls -1 data"],
                        tools=["search", "fetch", "parse"])
    assert not references("plain text with `code` and $5")
    with pytest.raises(ContextError, match="not a function name"):
        references("&`os.path.join`")
    assert references("&`os.path.join` and &`ok`", strict=False).tools == ["ok"]


def test_references_need_a_kernel():
    d = Dialogue(name="r", messages=[Message(id="p", kind=Kind.prompt, source="value: $`x`")])
    with pytest.raises(ContextError, match=r"\$`x`.*build_async"):
        build(d, "p")
    d = Dialogue(name="t", messages=[Message(kind=Kind.note, source="tools: &`f`"),
                                     Message(id="p", kind=Kind.prompt, source="go")])
    with pytest.raises(ContextError, match="&`f`"):
        build(d, "p")


@in_module_loop
async def test_variables_shell_and_tools_from_the_kernel(kernel: Kernel):
    await kernel.run(
        "nums = [3, 1, 2]\n"
        "def total(xs: list[int], # numbers to add\n"
        "          ) -> int:\n"
        "    'Add up numbers.'\n"
        "    return sum(xs)\n"
        "def ping() -> str:\n"
        "    'Say pong.'\n"
        "    return 'pong'\n"
        "def secret() -> str:\n"
        "    'Never offered.'\n"
        "    return 's'\n")
    d = Dialogue(name="refs", system="S", messages=[
        Message(kind=Kind.note, source="Tools for later: &`ping`"),
        Message(kind=Kind.note, source="hidden: &`secret`", hidden=True),
        Message(id="p", kind=Kind.prompt,
                source="Sort $`nums`; also $`missing_name`; files: !`printf 'a\\nb\\n'`. Use &`total`."),
    ])
    req = await build_async(d, "p", kernel=kernel)
    block = ('<variables>\n'
             '<variable expr="nums">\n[3, 1, 2]\n</variable>\n'
             '<variable expr="missing_name">\n[error: NameError: name \'missing_name\' is not defined]\n</variable>\n'
             '</variables>\n'
             '<shell>\n'
             '<command cmd="printf &#x27;a\\nb\\n&#x27;">\na\nb\n</command>\n'
             '</shell>')
    assert req.meta["refs"] == block
    assert req.messages[-1].content.endswith("Use &`total`.\n\n" + block)
    assert req.meta["ref_errors"] == ["$`missing_name`: NameError: name 'missing_name' is not defined"]
    assert [t.name for t in req.tools] == ["ping", "total"]
    total = req.tools[1]
    assert total == ToolSpec(
        name="total", description="Add up numbers.\n\nReturns:\n- type: integer",
        parameters={"type": "object", "required": ["xs"], "properties": {
            "xs": {"description": "numbers to add", "type": "array", "items": {"type": "integer"}}}},
        source="kernel")
    # The stored block of an earlier prompt is replayed as it was, not re-evaluated.
    d.messages[-1].response = "Done."
    d.messages[-1].meta["refs"] = req.meta["refs"]
    d.messages.append(Message(id="p2", kind=Kind.prompt, source="and now?"))
    await kernel.run("nums.append(99)")
    req2 = await build_async(d, "p2", kernel=kernel)
    assert req2.messages[0].content.endswith(block)
    assert req2.meta["refs"] == ""


@in_module_loop
async def test_a_tool_that_cannot_be_described_is_refused(kernel: Kernel):
    await kernel.run("def undocumented(x: int):\n    return x\n")
    d = Dialogue(name="bad", messages=[
        Message(id="p", kind=Kind.prompt, source="use &`[undocumented, nowhere]`")])
    with pytest.raises(ToolSchemaError) as e:
        await build_async(d, "p", kernel=kernel)
    assert "undocumented has no docstring" in str(e.value)
    assert "nowhere is not defined" in str(e.value)


# ---------------------------------------------------------------- long outputs

def test_carriage_returns_show_what_a_terminal_shows():
    # each \r goes back to the start of the line: the last state of a progress bar is what shows
    assert terminal_text("  0%\r 50%\r100%\ndone\n") == "100%\ndone\n"
    # a shorter redraw leaves the end of the longer one, as on a terminal (and in Jupyter)
    assert terminal_text("Downloading 10 of 10\rDone") == "Doneloading 10 of 10"
    # an erase-line code after the \r clears it first (rich's and pip's progress bars)
    assert terminal_text("Downloading 10 of 10\r\x1b[2KDone") == "Done"
    # \r\n is a newline (Windows line ends), colour codes go
    assert terminal_text("a\r\nb \x1b[31mred\x1b[0m\r\n") == "a\nb red\n"
    assert terminal_text("no carriage return \x1b[1mbold\x1b[0m") == "no carriage return bold"
    assert terminal_text("\x1b]0;a window title\x07x\ry") == "y"


def test_cut_keeps_head_and_tail_and_says_what_was_cut():
    lines = [f"Collecting package-{i:02d}" for i in range(59)]
    text = "\n".join(lines)
    out, cut = cut_text(text, OutputLimit())
    head, tail = "\n".join(lines[:20]), "\n".join(lines[-10:])
    cut_chars = len(text) - len(head) - len(tail)
    assert out == f"{head}\n[... 29 lines ({cut_chars:,} characters) cut ...]\n{tail}"
    assert cut == {"lines": 59, "chars": len(text), "kept_lines": 30, "cut_lines": 29,
                   "cut_chars": cut_chars}
    # deterministic: the same output gives the same text every time (prefix caches rely on it)
    assert cut_text(text, OutputLimit()) == (out, cut)
    # short enough: untouched; no limit: untouched
    assert cut_text("\n".join(lines[:30]), OutputLimit()) == ("\n".join(lines[:30]), None)
    assert cut_text(text, None) == (text, None)
    # the tail only (a training log's last lines), no character limit
    out, cut = cut_text(text, OutputLimit(head=0, tail=2, chars=0))
    assert out.split("\n") == ["[... 57 lines (" + f"{len(text) - len(chr(10).join(lines[-2:])):,}"
                               + " characters) cut ...]", *lines[-2:]]
    # one giant line (a big repr): the start and the end of it within the characters
    giant = "[" + ", ".join(str(i) for i in range(5000)) + "]"
    out, cut = cut_text(giant, OutputLimit(chars=300))
    first, marker, last = out.split("\n")
    assert giant.startswith(first) and giant.endswith(last) and len(first) + len(last) == 300
    assert marker == f"[... {len(giant) - 300:,} characters cut ...]"
    assert cut["kept_lines"] == 1 and cut["cut_lines"] == 0


def test_output_limit_settings_are_checked():
    assert parse_output_limit() == parse_output_limit("default") == OutputLimit(20, 10, 2000)
    assert parse_output_limit({"head": 5}) == OutputLimit(5, 10, 2000)
    assert parse_output_limit("40, 20, 4000") == OutputLimit(40, 20, 4000)
    for off in (0, None, False, "off", "0"):
        assert parse_output_limit(off) is None
    for bad, why in (({"head": -1}, "head must be a whole number"), ({"lines": 5}, "unknown key 'lines'"),
                     ({"chars": "lots"}, "chars must be"), ("20,10", "HEAD,TAIL,CHARS"),
                     ([20, 10], "expected"), (True, "expected")):
        with pytest.raises(ContextError, match=why):
            parse_output_limit(bad)
    assert with_output_limit({"x": 1}, "off") == {"x": 1, "output_limit": 0}
    assert with_output_limit({"output_limit": 0}, "default") == {}
    d = small_dialogue()
    d.meta["output_limit"] = {"head": "many"}
    with pytest.raises(ContextError, match="dialogue 'golden': output limit: head must be"):
        build(d, "p2")


PROGRESS_CELL = (
    "for i in range(0, 101, 5):\n"
    "    print(f'\\rDownloading model.bin {i:3d}%', end='', flush=True)\n"
    "print()\n"
    "for i in range(59):\n"
    "    print(f'Collecting package-{i:02d}')\n"
    "print('Successfully installed 59 packages')\n")
PROGRESS_LINES = (["Downloading model.bin 100%"] + [f"Collecting package-{i:02d}" for i in range(59)]
                  + ["Successfully installed 59 packages"])


def _sent_text(recorded) -> str:
    """Everything the model was sent, as the OpenAI SDK put it on the wire."""
    out = []
    for m in recorded.json["messages"]:
        c = m["content"]
        out.append(c if isinstance(c, str) else "\n".join(p.get("text", "") for p in c))
    return "\n\n".join(out)


def _shown(lines: list[str], head: int, tail: int) -> tuple[str, int]:
    """The fenced output the model should see with the first `head` and last `tail` lines kept,
    and the characters cut, computed from the full text independently of the cutting code."""
    full, h, t = "\n".join(lines), "\n".join(lines[:head]), "\n".join(lines[-tail:])
    cut_chars = len(full) - len(h) - len(t)
    n = len(lines) - head - tail
    return f"Output:\n```\n{h}\n[... {n} lines ({cut_chars:,} characters) cut ...]\n{t}\n```", cut_chars


async def test_a_long_kernel_output_reaches_the_model_shortened(tmp_path):
    """A real kernel runs a print loop with a \\r progress bar and 60 more lines; the model (a real
    OpenAI-compatible HTTP server here) receives the head and the tail, the answer records what
    was cut, and the dialogue's setting changes it."""
    from servers import ReplayServer, openai_chunks, sse

    from dialogue.service import DialogueService

    svc = DialogueService(tmp_path / "cut.db")
    try:
        with ReplayServer() as srv:
            d = svc.create("pip", model=f"openai-compatible:{srv.openai_base_url}/m")
            code = svc.add("pip", "code", PROGRESS_CELL)
            ran = await svc.run("pip", code.id)
            assert ran.meta["run"]["status"] == "ok"
            raw = "".join(o.get("text", "") for o in ran.outputs)
            # the store keeps the output as Jupyter shows it: the progress bar's last state
            assert raw.count("\r") == 0 and raw.startswith("Downloading model.bin 100%\n")

            srv.push(sse(openai_chunks(["ok"])))
            q1 = svc.add("pip", "prompt", "Did it install?")
            a1 = await svc.run("pip", q1.id)
            assert svc.run_status(a1) == "ok", a1.meta
            sent = _sent_text(srv.last)
            expected, cut_chars = _shown(PROGRESS_LINES, 20, 10)
            assert expected in sent
            assert "Downloading model.bin  5%" not in sent and "package-30" not in sent
            assert a1.meta["cut"] == [{"message": code.id, "lines": 61,
                                       "chars": len("\n".join(PROGRESS_LINES)), "kept_lines": 30,
                                       "cut_lines": 31, "cut_chars": cut_chars}]
            assert svc.message("pip", q1.id).meta["cut"] == a1.meta["cut"]  # stored

            # The next prompt's request starts with the same text: the cached prefix holds.
            srv.push(sse(openai_chunks(["yes"])))
            q2 = svc.add("pip", "prompt", "Which was last?")
            await svc.run("pip", q2.id)
            first_user = [m for m in srv.requests[-1].json["messages"] if m["role"] == "user"][0]
            before = [m for m in srv.requests[-2].json["messages"] if m["role"] == "user"][0]
            assert first_user["content"] == before["content"]

            # Pinning keeps a message in context; it does not make its output unbounded.
            svc.set_flags("pip", code.id, pinned=True)
            from dialogue.context import build
            assert expected in build(svc.open("pip"), q2.id).messages[0].text()

            # The per-dialogue setting, through the service's update path.
            svc.update("pip", output_limit={"head": 3, "tail": 2})
            assert svc.open("pip").meta["output_limit"] == {"head": 3, "tail": 2, "chars": 2000}
            srv.push(sse(openai_chunks(["ok"])))
            a2 = await svc.run("pip", q2.id)
            expected, cut_chars = _shown(PROGRESS_LINES, 3, 2)
            assert expected in _sent_text(srv.last)
            assert a2.meta["cut"][0]["kept_lines"] == 5 and a2.meta["cut"][0]["cut_chars"] == cut_chars

            # Off: the whole output, and no stale record of a cut on the answer.
            svc.update("pip", output_limit="off")
            assert svc.open("pip").meta["output_limit"] == 0
            srv.push(sse(openai_chunks(["ok"])))
            a3 = await svc.run("pip", q2.id)
            assert "Output:\n```\n" + "\n".join(PROGRESS_LINES) + "\n```" in _sent_text(srv.last)
            assert "cut" not in a3.meta

            # A bad value is refused with one line, and nothing changes.
            version = svc.open("pip").version
            with pytest.raises(ContextError, match="tail must be a whole number"):
                svc.update("pip", output_limit={"tail": -3})
            with pytest.raises(ContextError, match="unknown key"):
                svc.update("pip", meta={**svc.open("pip").meta, "output_limit": {"rows": 3}})
            assert svc.open("pip").version == version
            svc.update("pip", output_limit="default")
            assert "output_limit" not in svc.open("pip").meta
    finally:
        await svc.aclose()


def test_cli_new_takes_an_output_limit(tmp_path, capsys):
    from dialogue.cli.main import main
    from dialogue.service import DialogueService

    db = str(tmp_path / "cli.db")
    assert main(["--db", db, "new", "logs", "--output-limit", "5,3,0"]) == 0
    assert main(["--db", db, "new", "bad", "--output-limit", "lots"]) == 1
    assert "output limit 'lots': give HEAD,TAIL,CHARS" in capsys.readouterr().err
    svc = DialogueService(db)
    try:
        assert svc.open("logs").meta["output_limit"] == {"head": 5, "tail": 3, "chars": 0}
        assert [r["name"] for r in svc.list()] == ["logs"]  # the bad one was not created
    finally:
        svc.close()


# ---------------------------------------------------------------- references in code

def test_references_inside_markdown_code_are_text():
    quoted = ("Use ``!`ls` `` to list files and `` $`x` `` for values; ```&`f` ``` is a tool.\n\n"
              "```\n!`rm -rf build`\n$`secret`\n```\n\n"
              "~~~python\n&`g`\n~~~\n\n"
              "    !`indented code`\n\n"
              r"An escaped \!`sigil` too.")
    assert not references(quoted)
    assert references(quoted + "\n\nBut run !`date`, show $`df.shape` with &`h`.") == Refs(
        exprs=["df.shape"], cmds=["date"], tools=["h"])
    # a code span of any number of backticks, as CommonMark reads it
    assert references("!``echo `date` ``").cmds == ["echo `date`"]
    assert references("> quoted !`a`\n- item $`b`\n# heading &`c`") == Refs(
        exprs=["b"], cmds=["a"], tools=["c"])


@in_module_loop
async def test_quoted_commands_are_not_run(kernel: Kernel, tmp_path):
    """A prompt quoting !`touch FILE` in an inline code span and in a fenced block creates no
    file; the same reference outside code is run."""
    inline, fenced, real = (tmp_path / n for n in ("inline", "fenced", "real"))
    d = Dialogue(name="quote", messages=[Message(id="p", kind=Kind.prompt, source=(
        f"To make a file write ``!`touch {inline}` `` in a prompt, or:\n\n"
        f"```\n!`touch {fenced}`\n```\n\n"
        f"Now really: !`touch {real}`"))])
    req = await build_async(d, "p", kernel=kernel)
    assert real.exists()
    assert not inline.exists() and not fenced.exists()
    assert list(references(d.messages[0].source).cmds) == [f"touch {real}"]
    text = req.messages[-1].text()
    assert f"``!`touch {inline}` ``" in text and f"!`touch {fenced}`" in text  # quoted as written
    assert f'<command cmd="touch {real}">' in req.meta["refs"]


async def test_a_prompt_that_only_quotes_references_needs_no_kernel(tmp_path):
    from servers import ReplayServer, openai_chunks, sse

    from dialogue.service import DialogueService

    target = tmp_path / "never"
    svc = DialogueService(tmp_path / "q.db")
    try:
        with ReplayServer() as srv:
            svc.create("q", model=f"openai-compatible:{srv.openai_base_url}/m")
            srv.push(sse(openai_chunks(["It runs a command."])))
            p = svc.add("q", "prompt", f"What does ``!`touch {target}` `` do in a prompt?")
            answer = await svc.run("q", p.id)
            assert svc.run_status(answer) == "ok", answer.meta
            assert f"``!`touch {target}` ``" in _sent_text(srv.last)
        assert svc.kernel_status("q") == "none" and not target.exists()
    finally:
        await svc.aclose()
