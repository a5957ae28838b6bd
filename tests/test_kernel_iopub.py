"""A run ends even when IOPub loses messages: against a real ipykernel.

IOPub is a PUB socket: when the app reads more slowly than the kernel sends, ZeroMQ drops
messages past the high-water marks, and the `status: idle` that ends a run can be one of them.
A run then ends with its execute_reply and a short quiet grace, keeps what arrived, and says that
output may be missing. The client class is the seam: a subclass filters or slows what it reads.
"""
from __future__ import annotations

import asyncio
import queue
import time

import pytest
from jupyter_client.asynchronous import AsyncKernelClient

import dialogue.kernel.kernel as kernel_module
from dialogue.kernel import Kernel
from dialogue.kernel.inside.launcher import HWM_ENV
from dialogue.kernel.kernel import LOST_OUTPUT, LOST_OUTPUT_NOTE

pytestmark = pytest.mark.asyncio(loop_scope="module")

SEEN: list[tuple[str, str]] = []  # (idle | reply, the run's msg_id) as the client read them
LOSE_IDLE = "# test: lose this run's idle"
SLOW_REPLY = "# test: the reply comes late"


class LossyClient(AsyncKernelClient):
    """Loses the `status: idle` of a run whose code contains LOSE_IDLE, as an overflowing PUB
    socket would; holds back the execute_reply of one containing SLOW_REPLY for a second, so its
    idle comes first. Records the order in which a run's idle and reply were read."""

    def _state(self) -> dict:
        if not hasattr(self, "_test_state"):
            self._test_state = {"lose": set(), "slow": set(), "seen": SEEN}
        return self._test_state

    async def get_iopub_msg(self, *args, **kwargs):
        msg = await super().get_iopub_msg(*args, **kwargs)
        st, parent = self._state(), msg["parent_header"].get("msg_id")
        if msg["msg_type"] == "execute_input":
            code = msg["content"].get("code", "")
            if LOSE_IDLE in code:
                st["lose"].add(parent)
            if SLOW_REPLY in code:
                st["slow"].add(parent)
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            if parent in st["lose"]:
                raise queue.Empty  # gone, as if never sent
            st["seen"].append(("idle", parent))
        return msg

    async def get_shell_msg(self, *args, **kwargs):
        msg = await super().get_shell_msg(*args, **kwargs)
        st, parent = self._state(), msg["parent_header"].get("msg_id")
        if msg["msg_type"] == "execute_reply":
            if parent in st["slow"]:
                await asyncio.sleep(1.0)
            st["seen"].append(("reply", parent))
        return msg


class LossyKernel(Kernel):
    client_class = LossyClient


def stream_text(res) -> str:
    return "".join(o.get("text", "") for o in res.outputs if o["output_type"] == "stream")


async def test_a_lost_idle_ends_the_run_after_the_grace_with_its_outputs_and_a_note():
    async with LossyKernel(idle_grace=1.0) as k:
        t = time.monotonic()
        res = await k.run(f"{LOSE_IDLE}\nfor i in range(3): print(i, flush=True)\n40 + 2",
                          timeout=60)
        took = time.monotonic() - t
        assert res.status == "ok"
        assert res.execution_count == 1
        assert stream_text(res).startswith("0\n1\n2\n")
        assert LOST_OUTPUT_NOTE.strip() in stream_text(res)
        assert {"output_type": "execute_result", "execution_count": 1}.items() <= res.outputs[1].items()
        assert res.message == LOST_OUTPUT
        assert 1.0 <= took < 5, took  # the grace, not the 60 s timeout (nor forever)
        # the note is the last output, as a follower sees it too
        assert res.outputs[-1]["name"] == "stderr"
        # the kernel goes on as before: the next run ends with its idle, with no note
        t = time.monotonic()
        res = await k.run("print('next')", timeout=60)
        assert (res.status, res.execution_count, stream_text(res), res.message) == ("ok", 2, "next\n", "")
        assert time.monotonic() - t < 1.0


async def test_a_lost_idle_of_a_failing_cell_keeps_its_error_and_says_both():
    async with LossyKernel(idle_grace=0.5) as k:
        res = await k.run(f"{LOSE_IDLE}\nprint('before')\n1 / 0", timeout=60)
        assert res.status == "error" and res.execution_count == 1
        assert [o["output_type"] for o in res.outputs] == ["stream", "error", "stream"]
        assert res.outputs[1]["ename"] == "ZeroDivisionError"
        assert res.message == f"ZeroDivisionError: division by zero; {LOST_OUTPUT}"


async def test_a_lost_idle_with_stdin_allowed_ends_too():
    """The run that may ask for input waits on IOPub and stdin at once: the same grace."""
    async with LossyKernel(idle_grace=0.5) as k:
        ex = k.execute(f"{LOSE_IDLE}\nname = input('who? ')\nprint('hi', name)", allow_stdin=True)
        async for out in ex:
            if out["output_type"] == "input_request":
                ex.reply("ann")
        res = await ex
        assert res.status == "ok" and res.message == LOST_OUTPUT
        assert stream_text(res).startswith("who? ann\nhi ann\n")


async def test_an_idle_before_the_reply_still_takes_the_replys_count_and_status():
    async with LossyKernel(idle_grace=0.5) as k:
        await k.run("x = 1")
        ex = k.execute(f"{SLOW_REPLY}\nprint('hi')\nraise KeyError('k')", timeout=60)
        outs = [o async for o in ex]
        res = await ex
        kinds = [kind for kind, parent in SEEN if parent == ex.msg_id]
        assert kinds == ["idle", "reply"]  # the order this test is about
        assert res.status == "error" and res.message == "KeyError: 'k'"
        assert res.execution_count == 2
        assert [o["output_type"] for o in outs] == ["stream", "error"]
        assert LOST_OUTPUT_NOTE.strip() not in stream_text(res)


async def test_a_timeout_still_interrupts_a_cell_whose_idle_is_lost():
    async with LossyKernel(idle_grace=0.5) as k:
        t = time.monotonic()
        res = await k.run(f"{LOSE_IDLE}\nimport time\nprint('a', flush=True)\ntime.sleep(30)",
                          timeout=1)
        assert res.status == "timeout" and "interrupted" in res.message
        assert LOST_OUTPUT in res.message
        assert stream_text(res).startswith("a\n")
        assert time.monotonic() - t < 5
        assert (await k.run("print('alive')")).ok


class SlowReader(AsyncKernelClient):
    """Reads IOPub at most ~2000 messages a second, as a busy app would."""

    async def get_iopub_msg(self, *args, **kwargs):
        msg = await super().get_iopub_msg(*args, **kwargs)
        time.sleep(0.0005)  # blocks the loop, like other work in a loaded app
        return msg


class SlowKernel(Kernel):
    client_class = SlowReader


CHATTY = "for i in range(20_000): print(i, flush=True)"  # 20,000 IOPub messages


@pytest.mark.slow
async def test_a_slow_reader_with_zmqs_default_hwm_loses_output_and_the_run_still_ends(monkeypatch):
    """The failure as it happens: ZeroMQ's default high-water marks (1000 messages each side)
    and a reader slower than the kernel. Before the fix this run never ended."""
    monkeypatch.setattr(kernel_module, "IOPUB_RCVHWM", 1000)
    async with SlowKernel(env={HWM_ENV: "1000"}, idle_grace=2.0) as k:
        res = await asyncio.wait_for(k.run(CHATTY, timeout=120), 120)
        lines = [line for line in stream_text(res).splitlines() if line.isdigit()]
        assert res.status == "ok" and res.execution_count == 1
        assert len(lines) < 20_000  # the drop is real
        assert lines[:1000] == [str(i) for i in range(1000)]  # what came first is kept, in order
        # which messages ZeroMQ drops is up to timing: the run can tell only when the idle was
        # among them (IOPub has no sequence numbers), and then the note and the message say so
        # together (test_a_lost_idle_ends_the_run_after_the_grace_with_its_outputs_and_a_note
        # drops the idle on purpose)
        assert res.message in ("", LOST_OUTPUT)
        assert (res.message == LOST_OUTPUT) == (LOST_OUTPUT_NOTE.strip() in stream_text(res))


@pytest.mark.slow
async def test_a_slow_reader_loses_nothing_with_our_hwm():
    """The same cell and reader with the kernel's and the client's raised high-water marks."""
    async with SlowKernel(idle_grace=2.0) as k:
        hwm = await k.eval("get_ipython().kernel.iopub_thread.socket.getsockopt(__import__('zmq').SNDHWM)")
        assert int(hwm) == 100_000
        res = await asyncio.wait_for(k.run(CHATTY, timeout=120), 120)
        assert res.status == "ok" and res.message == ""
        assert stream_text(res) == "".join(f"{i}\n" for i in range(20_000))
