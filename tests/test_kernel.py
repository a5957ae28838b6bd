"""The live kernel, against a real ipykernel subprocess."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import nbformat
import psutil
import pytest
import pytest_asyncio

import dialogue
from dialogue.kernel import ExecutionError, Kernel, KernelPool, KernelStartError, KernelTimeout
from dialogue.kernel.outputs import fold_output, stored_outputs

pytestmark = pytest.mark.asyncio(loop_scope="module")

SRC = str(Path(dialogue.__file__).resolve().parents[1])


def tiny_png(w: int = 2, h: int = 2, noise: bool = False) -> bytes:
    """A valid PNG built by hand, so the test needs no imaging library; `noise` makes its pixels
    random, so it does not compress."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + (os.urandom(3 * w) if noise else b"\xff\x00\x00" * w) for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kernel():
    k = Kernel()
    await k.start()
    yield k
    await k.shutdown()


def validate_outputs(outputs: list[dict]) -> None:
    """Stored outputs must be valid nbformat: put them in a notebook and validate it."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=outputs)])
    nbformat.validate(nb)


def kernel_pids_in(d: str) -> list[int]:
    """Processes whose command line names a file in directory d (a kernel's private dir)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if d in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p.info["pid"])
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- outputs

async def test_outputs_of_every_kind(kernel: Kernel):
    png = tiny_png()
    code = textwrap.dedent(f"""
        import sys, base64
        from IPython.display import display, HTML, Image
        print("to stdout")
        print("to stderr", file=sys.stderr)
        display(HTML("<b>bold</b>"))
        display(Image(data=base64.b64decode({base64.b64encode(png).decode()!r}), format="png"))
        40 + 2
    """)
    res = await kernel.run(code)
    assert res.status == "ok", res.message
    kinds = [(o["output_type"], o.get("name")) for o in res.outputs]
    assert kinds == [("stream", "stdout"), ("stream", "stderr"), ("display_data", None),
                     ("display_data", None), ("execute_result", None)]
    assert res.outputs[0]["text"] == "to stdout\n"
    assert res.outputs[1]["text"] == "to stderr\n"
    assert res.outputs[2]["data"]["text/html"] == "<b>bold</b>"
    assert base64.b64decode(res.outputs[3]["data"]["image/png"]) == png
    assert res.outputs[4]["data"]["text/plain"] == "42"
    assert res.outputs[4]["execution_count"] == res.execution_count > 0
    validate_outputs(res.outputs)


async def test_error_output_with_traceback(kernel: Kernel):
    res = await kernel.run("def f():\n    return 1/0\nf()")
    assert res.status == "error"
    assert res.message == "ZeroDivisionError: division by zero"
    (err,) = res.outputs
    assert err["output_type"] == "error" and err["ename"] == "ZeroDivisionError"
    assert err["evalue"] == "division by zero"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err["traceback"]))  # tracebacks are coloured
    assert "return 1/0" in plain and "ZeroDivisionError" in plain
    assert res.execution_count is not None
    validate_outputs(res.outputs)


async def test_outputs_stream_as_they_arrive(kernel: Kernel):
    ex = kernel.execute("import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.4)")
    seen, done_at_first = [], None
    async for out in ex:
        if done_at_first is None:
            done_at_first = ex.result is not None
        seen.append(out)
    res = await ex
    # The first output reached us while the cell was still running.
    assert done_at_first is False
    assert [o["text"] for o in seen] == ["0\n", "1\n", "2\n"]
    # Stored: consecutive chunks of one stream merged into one output.
    assert res.outputs == [{"output_type": "stream", "name": "stdout", "text": "0\n1\n2\n"}]


async def test_runs_are_serialized(kernel: Kernel):
    a = kernel.execute("import time; time.sleep(0.3); 'a'")
    b = kernel.execute("'b'")
    ra, rb = await asyncio.gather(a, b)
    assert ra.outputs[0]["data"]["text/plain"] == "'a'"
    assert rb.outputs[0]["data"]["text/plain"] == "'b'"
    assert rb.execution_count == ra.execution_count + 1


async def test_clear_output_and_display_update(kernel: Kernel):
    code = textwrap.dedent("""
        from IPython.display import display, clear_output
        print("gone")
        clear_output()
        h = display("first", display_id=True)
        h.update("second")
        print("kept")
    """)
    ex = kernel.execute(code)
    items = [o async for o in ex]
    res = await ex
    assert {"output_type": "clear_output"} in items
    shown = next(o for o in items if o["output_type"] == "display_data")
    update = next(o for o in items if o["output_type"] == "update_display_data")
    assert shown["transient"]["display_id"] == update["display_id"]
    assert update["data"]["text/plain"] == "'second'"
    assert [o["output_type"] for o in res.outputs] == ["display_data", "stream"]
    assert res.outputs[0]["data"]["text/plain"] == "'second'"
    assert res.outputs[1]["text"] == "kept\n"
    validate_outputs(res.outputs)


async def test_waiting_clears_and_updates_of_a_shared_display_id(kernel: Kernel):
    """Jupyter's rules, in a real kernel: an update reaches every display with its id; a
    clear_output(wait=True) clears only when the next output comes (and never if none does).
    Folding the items the run passes on, as a follower does, gives the stored outputs."""
    code = textwrap.dedent("""
        from IPython.display import display, clear_output
        h = display("a", display_id="x")
        print("between")
        display("b", display_id="x")
        display("other", display_id="y")
        h.update("c")
        clear_output(wait=True)
        h.update("d")
        print("frame 1")
        clear_output(wait=True)
        print("frame 2")
        clear_output(wait=True)
    """)
    ex = kernel.execute(code)
    items = [o async for o in ex]
    res = await ex
    assert not any(o.get("wait") for o in items)
    folded: list[dict] = []
    shown_before_clears = []
    for o in items:
        if o["output_type"] == "clear_output":
            shown_before_clears.append([d.get("data", {}).get("text/plain", d.get("text"))
                                        for d in folded])
        assert fold_output(folded, o) is False
    # the waiting clear kept the cell as it was until "frame 1" came, and the update meanwhile
    # reached both displays with id x, and not the other one
    assert shown_before_clears == [["'d'", "between\n", "'d'", "'other'"], ["frame 1\n"]]
    assert res.outputs == stored_outputs(folded)
    assert res.outputs == [{"output_type": "stream", "name": "stdout", "text": "frame 2\n"}]
    validate_outputs(res.outputs)


async def test_helpers_run_from_their_files(kernel: Kernel):
    """The kernel-side helpers are real files: a traceback through them names the file and shows
    its lines, and their folder is not on the user's import path."""
    res = await kernel.run("__import__('_dialogue_kernel').shell(None, 1, 1)")
    tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(res.outputs[-1]["traceback"]))
    assert res.status == "error" and "kernel/inside/helpers.py" in tb
    assert "r = _subprocess.run(cmd, shell=True" in tb  # the source line, read from the file
    assert await kernel.eval("[p for p in __import__('sys').path if p.endswith('inside')]") == "[]"
    with pytest.raises(ExecutionError, match="ModuleNotFoundError"):
        await kernel.call("import helpers")


async def test_output_cap_keeps_a_prefix_and_says_what_was_cut():
    async with Kernel(output_cap=10_000) as k:
        res = await k.run("for i in range(20_000):\n    print('x' * 99)")
        assert res.status == "ok"
        out, note = res.outputs
        assert out["text"] == ("x" * 99 + "\n") * 100  # exactly 10,000 characters
        assert res.truncated == 20_000 * 100 - 10_000
        assert note["name"] == "stderr"
        assert f"cut {res.truncated:,}" in note["text"] and "kept 10,000" in note["text"]
        # An image that does not fit is left out whole, and counted.
        res = await k.run("from IPython.display import Image, display\n"
                          f"display(Image(data={tiny_png(100, 100, noise=True)!r}, format='png'))\n"
                          "print('after')")
        assert [o["output_type"] for o in res.outputs] == ["stream", "stream"]
        assert res.outputs[0]["text"] == "after\n" and res.truncated > 0
        # The error of a cell over the cap is still kept.
        res = await k.run("print('y' * 20_000)\nraise ValueError('the end')")
        assert res.status == "error"
        assert [o["output_type"] for o in res.outputs] == ["stream", "error", "stream"]
        validate_outputs(res.outputs)


@pytest.mark.slow
async def test_100mb_of_prints_do_not_fill_the_servers_memory(tmp_path: Path):
    """100 MB of prints with a 100 kB cap: the client's peak memory grows by far less than the
    output (ipykernel sends prints in batches of a few MB; only the batch in hand is held).
    Measured in a fresh process so that the peak belongs to this run alone."""
    script = tmp_path / "mem.py"
    script.write_text(textwrap.dedent("""
        import asyncio, resource
        from dialogue.kernel import Kernel
        async def main():
            async with Kernel(output_cap=100_000) as k:
                await k.run("x = 1")
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                res = await k.run("for i in range(1_000_000):\\n    print('z' * 99)")
                after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                print(res.status, res.truncated, len(res.outputs[0]["text"]), after - before)
        asyncio.run(main())
    """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert p.returncode == 0, p.stderr
    status, cut, kept, grown_kb = p.stdout.split()
    assert status == "ok" and int(kept) == 100_000 and int(cut) == 100_000_000 - 100_000
    assert int(grown_kb) < 60_000, f"peak memory grew by {grown_kb} kB for 100 MB of output"


# ---------------------------------------------------------------- control

async def test_interrupt_sleep_returns_within_2s(kernel: Kernel):
    await kernel.run("survivor = 7")
    ex = kernel.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    async for out in ex:  # the cell is running once it prints
        break
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await kernel.interrupt()
    res = await ex
    assert time.monotonic() - t0 < 2.0
    assert res.status == "interrupted"
    assert res.outputs[0]["text"] == "sleeping\n" and res.outputs[-1]["ename"] == "KeyboardInterrupt"
    assert (await kernel.eval("survivor")) == "7"


async def test_timeout_interrupts_and_keeps_state(kernel: Kernel):
    await kernel.run("kept = 'yes'")
    res = await kernel.run("import time\ntime.sleep(60)", timeout=1)
    assert res.status == "timeout"
    assert "timed out after 1 s" in res.message and "kept" in res.message
    assert (await kernel.eval("kept")) == "'yes'"


async def test_timeout_of_a_cell_that_ignores_interrupts():
    async with Kernel(interrupt_grace=1.0) as k:
        pid = k.pid
        res = await k.run("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                          "time.sleep(60)", timeout=1)
        assert res.status == "timeout"
        assert "did not stop when interrupted" in res.message
        assert gone(pid)
        res = await k.run("1 + 1")
        assert res.ok and k.pid != pid and k.generation == 2


async def test_os_exit_is_detected_and_recovered():
    async with Kernel() as k:
        await k.run("x = 1")
        pid = k.pid
        res = await k.run("import os\nos._exit(1)")
        assert res.status == "died"
        assert res.message.startswith("The kernel exited with status 1; its variables are lost.")
        assert not k.is_alive
        res = await k.run("x")
        assert res.status == "error" and res.outputs[0]["ename"] == "NameError"
        assert k.pid != pid and k.is_alive and k.generation == 2


async def test_killed_kernel_says_so():
    async with Kernel() as k:
        res = await k.run("import os, signal\nprint('before', flush=True)\nimport time; time.sleep(0.2)\n"
                          "os.kill(os.getpid(), signal.SIGKILL)")
        assert res.status == "died"
        assert "killed by SIGKILL" in res.message and "out of memory" in res.message
        assert res.outputs == [{"output_type": "stream", "name": "stdout", "text": "before\n"}]
        assert (await k.run("2")).ok


async def test_kernel_that_died_while_idle_is_replaced():
    async with Kernel() as k:
        pid = k.pid
        os.kill(pid, signal.SIGKILL)
        while k.is_alive:  # (the process shows as a zombie before all its threads are gone)
            await asyncio.sleep(0.05)
        res = await k.run("'fresh'")
        assert res.ok and k.pid != pid


async def test_restart_clears_variables():
    async with Kernel() as k:
        await k.run("a = 1")
        pid = k.pid
        await k.restart()
        assert k.pid != pid and gone(pid)
        res = await k.run("a")
        assert res.status == "error" and res.execution_count == 1


async def test_shutdown_during_a_run_ends_it():
    k = Kernel()
    ex = k.execute("import time\ntime.sleep(60)")
    while k.pid is None or not k.busy:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await k.shutdown()
    res = await ex
    assert res.status == "died" and "shut down" in res.message


async def test_cancelling_run_interrupts_the_cell(kernel: Kernel):
    task = asyncio.ensure_future(kernel.run("import time\ntime.sleep(60)"))
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    res = await kernel.run("'next'")  # gets the kernel as soon as the interrupted cell stops
    assert res.ok
    # A run cancelled while it waits for its turn never runs, and the running cell is left alone.
    first = kernel.execute("import time\ntime.sleep(1)\n'first'")
    queued = asyncio.ensure_future(kernel.run("never_ran = True"))
    await asyncio.sleep(0.3)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert (await first).outputs[0]["data"]["text/plain"] == "'first'"
    assert await kernel.eval("'never_ran' in dir()") == "False"


# ---------------------------------------------------------------- helpers for prompts

async def test_eval_and_shell(kernel: Kernel, tmp_path: Path):
    await kernel.run("import os\nnums = list(range(4))\ntext = 'two\\nlines'")
    assert await kernel.eval("nums") == "[0, 1, 2, 3]"
    assert await kernel.eval("len(nums) * 2") == "8"
    with pytest.raises(ExecutionError) as e:
        await kernel.eval("undefined_name")
    assert e.value.ename == "NameError"
    out = await kernel.shell("echo out; echo err >&2; exit 3")
    assert out == "out\nerr\n[exit status 3]"
    # the shell runs where the kernel is
    await kernel.run(f"os.chdir({str(tmp_path)!r})")
    (tmp_path / "marker.txt").write_text("m")
    assert "marker.txt" in await kernel.shell("ls")
    with pytest.raises(ValueError):
        await kernel.eval("  ")


async def test_helpers_stay_out_of_the_users_namespace(kernel: Kernel):
    await kernel.ensure_module("_dialogue_probe", "VALUE = 41 + 1")
    assert await kernel.eval("__import__('_dialogue_probe').VALUE") == "42"
    names = await kernel.eval("sorted(n for n in dir() if 'dialogue' in n)")
    assert names == "[]"
    with pytest.raises(ValueError):
        await kernel.ensure_module("os", "x = 1")


async def test_silent_call_timeout(kernel: Kernel):
    with pytest.raises(KernelTimeout):
        await kernel.call("import time\ntime.sleep(60)", "1", timeout=1)
    assert await kernel.eval("1 + 1") == "2"


# ---------------------------------------------------------------- isolation

async def test_ipc_transport_in_a_private_directory(kernel: Kernel):
    d = kernel._dir
    assert d is not None and os.stat(d).st_mode & 0o777 == 0o700
    info = json.loads(Path(d, "kernel.json").read_text())
    assert info["transport"] == "ipc" and info["ip"].startswith(d)
    proc = psutil.Process(kernel.pid)
    assert proc.net_connections(kind="inet") == []
    assert not any(c.laddr for c in psutil.Process().net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and c.pid == kernel.pid)


async def test_bad_input_is_refused_clearly(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        Kernel(cwd=tmp_path / "nope")
    with pytest.raises(ValueError):
        Kernel(output_cap=-1)
    k = Kernel(python=str(tmp_path / "no-python"))
    with pytest.raises(KernelStartError, match="could not start"):
        await k.start()
    res = await k.run("1")
    assert res.status == "died" and "could not start" in res.message
    with pytest.raises(TypeError):
        Kernel().execute(b"1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Kernel().execute("1", timeout=0)


# ---------------------------------------------------------------- pool and orphans

async def test_pool_lazy_start_idle_shutdown_and_shutdown_all():
    pool = KernelPool(idle_timeout=0.5, check_every=3600)
    assert pool.peek("d1") is None
    k1 = await pool.get("d1")
    assert k1.is_alive and await pool.get("d1") is k1
    k2 = await pool.get("d2")
    assert k2 is not k1 and k2.pid != k1.pid
    dirs = [k1._dir, k2._dir]
    await asyncio.sleep(0.7)
    await k2.run("1")  # d2 is in use, d1 has been idle
    assert await pool.reap_idle() == ["d1"]
    assert "d1" not in pool and not k1.is_alive
    await pool.shutdown_all()
    assert len(pool) == 0
    for d in dirs:
        assert kernel_pids_in(d) == [] and not os.path.exists(d)


ORPHAN_SCRIPT = """
import asyncio, os, signal, sys, time
from dialogue.kernel import KernelPool
async def main():
    pool = KernelPool()
    ks = [await pool.get("a"), await pool.get("b")]
    await ks[0].run("import time")
    print(" ".join(str(k.pid) for k in ks), " ".join(k._dir for k in ks), flush=True)
    how = sys.argv[1]
    if how == "exit":
        sys.stdin.readline()  # the test has seen the kernels alive
        return  # no shutdown_all: the exit hook must do it
    time.sleep(60)  # killed from outside meanwhile
asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "sigterm", "sigkill"])
async def test_no_kernel_outlives_the_server(tmp_path: Path, how: str):
    script = tmp_path / "server.py"
    script.write_text(ORPHAN_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": SRC})
    line = p.stdout.readline().split()
    pids, dirs = [int(x) for x in line[:2]], line[2:]
    assert all(not gone(pid) for pid in pids)
    if how == "exit":
        p.stdin.write("go\n")
        p.stdin.flush()
    if how == "sigterm":
        p.send_signal(signal.SIGTERM)
    elif how == "sigkill":
        p.kill()
    p.wait(30)
    if how == "sigterm":
        assert p.returncode == -signal.SIGTERM  # it still dies by the signal, after cleaning up
    # a SIGKILLed server: the supervisors see their pipe close, end their kernels, then exit
    # themselves (a moment after the kernels: wait for both)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (all(gone(pid) for pid in pids)
                                                and not any(kernel_pids_in(d) for d in dirs)):
        time.sleep(0.1)
    assert all(gone(pid) for pid in pids), f"orphaned kernels after {how}"
    for d in dirs:
        assert kernel_pids_in(d) == []
    if how == "sigkill":
        # Nothing could remove the private directories; the next kernel started sweeps them.
        async with Kernel():
            pass
    assert not any(os.path.exists(d) for d in dirs)
