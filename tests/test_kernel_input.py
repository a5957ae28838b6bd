"""input() and getpass() in a cell, against a real ipykernel: the kernel's stdin requests reach
the run's listener, which answers; without a listener that can answer, the cell is told so."""
from __future__ import annotations

import asyncio

import pytest

from dialogue.document import Kind
from dialogue.kernel import Kernel, KernelError
from dialogue.service import DialogueService, RunError

pytestmark = pytest.mark.asyncio(loop_scope="function")

ASK = ("name = input('Name? ')\n"
       "import getpass\n"
       "pw = getpass.getpass('Password: ')\n"
       "print('hello', name, len(pw))")


async def test_the_kernel_asks_and_the_execution_answers():
    async with Kernel() as k:
        ex = k.execute(ASK, allow_stdin=True)
        seen = []
        async for out in ex:
            seen.append(out)
            if out["output_type"] == "input_request":
                assert ex.waiting_for_input == {"output_type": "input_request",
                                                "prompt": out["prompt"], "password": out["password"]}
                ex.reply("s3cret\nignored" if out["password"] else "Ada")
                assert ex.waiting_for_input is None
                with pytest.raises(KernelError, match="not waiting for input"):
                    ex.reply("again")
        res = await ex
        assert [o["prompt"] for o in seen if o["output_type"] == "input_request"] == ["Name? ", "Password: "]
        assert [o["password"] for o in seen if o["output_type"] == "input_request"] == [False, True]
        # what a terminal shows: the typed name, never the password; one line of it only
        assert res.status == "ok"
        assert res.outputs == [{"output_type": "stream", "name": "stdout",
                                "text": "Name? Ada\nPassword: \nhello Ada 6\n"}]
        # without stdin the cell is told at once, instead of waiting for nobody
        res = await k.run("input('x')")
        assert res.status == "error" and "StdinNotImplementedError" in res.message


async def test_interrupting_a_cell_that_waits_for_input():
    async with Kernel() as k:
        ex = k.execute("input('never answered')", allow_stdin=True)
        async for out in ex:
            if out["output_type"] == "input_request":
                await ex.interrupt()
        res = await ex
        assert res.status == "interrupted"
        assert (await k.run("print(1 + 1)")).outputs[0]["text"] == "2\n"  # the kernel lives on


@pytest.fixture
async def svc(tmp_path):
    s = DialogueService(tmp_path / "d.db", kernel_idle_timeout=None)
    yield s
    await s.aclose()


async def test_a_listener_answers_through_the_service(svc):
    d = svc.create("in")
    m = svc.add(d.id, Kind.code, ASK)
    svc.start(d.id, m.id, stdin=True)
    with pytest.raises(RunError, match="not waiting"):
        svc.reply_input(m.id, "too early")  # no question yet
    questions = []
    async for ev in svc.subscribe(m.id):
        if ev.type == "input" and ev.data:
            questions.append(ev.data)
            assert svc.live(m.id).input == ev.data  # a page that opens now shows the question
            svc.reply_input(m.id, "pw" if ev.data["password"] else "Grace")
            assert svc.live(m.id).input is None
    final = svc.message(d.id, m.id)
    assert questions == [{"prompt": "Name? ", "password": False},
                         {"prompt": "Password: ", "password": True}]
    assert final.outputs[0]["text"] == "Name? Grace\nPassword: \nhello Grace 2\n"
    assert svc.run_status(final) == "ok"


async def test_a_callable_answers(svc):
    d = svc.create("cb")
    asked = []

    def sync_answer(prompt, password):  # a plain function runs in a thread
        asked.append((prompt, password))
        return "x" * 3 if password else "Linus"

    m = svc.add(d.id, Kind.code, ASK)
    done = await svc.run(d.id, m.id, stdin=sync_answer)
    assert asked == [("Name? ", False), ("Password: ", True)]
    assert done.outputs[0]["text"].endswith("hello Linus 3\n")

    async def async_answer(prompt, password):
        await asyncio.sleep(0)
        return "Async"

    m = svc.add(d.id, Kind.code, "print(input('? ') * 2)")
    done = await svc.run(d.id, m.id, stdin=async_answer)
    assert done.outputs[0]["text"] == "? Async\nAsyncAsync\n"

    def no_input(prompt, password):
        raise EOFError

    m = svc.add(d.id, Kind.code, "input('? ')")
    done = await svc.run(d.id, m.id, stdin=no_input)
    assert svc.run_status(done) == "interrupted"
    # the default: no stdin, so the cell says so instead of hanging
    m = svc.add(d.id, Kind.code, "input('? ')")
    done = await svc.run(d.id, m.id)
    assert svc.run_status(done) == "error" and "StdinNotImplementedError" in done.meta["run"]["message"]
