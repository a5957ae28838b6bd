"""Building the model's request from a dialogue."""
from __future__ import annotations

import base64
import json
import math

import pytest
import pytest_asyncio

from dialogue.context import (
    DEFAULT_SYSTEM, ContextError, Refs, build, build_async, estimate_tokens, references,
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
              "refs": "", "ref_errors": []},
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
    text = json.dumps(req.to_dict())
    assert "visible note" in text
    assert "hidden" not in text
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
    text = build(d, "p", max_output_chars=300).messages[0].text()
    assert "line 0\n" in text and "line 9999" in text and "characters cut" in text
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
    from dialogue.local.models import bundled_model_path

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
            "xs": {"description": "numbers to add", "type": "array", "items": {"type": "integer"}}}})
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
