"""Nothing a cell starts outlives its kernel or the app: real ipykernels, real escaping processes
(a new session, a setsid double fork, nohup in the background, a plain child), ended by a kernel
restart, a shutdown, the kernel's own death and a SIGKILL of the server. Each case runs with a
cgroup where this machine allows one and with the subreaper fallback."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import dialogue
from dialogue.kernel import Kernel
from dialogue.kernel.supervisor import DISABLE_CGROUP_ENV, CGroup

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="the strong guarantee is Linux's (cgroup or subreaper)"),
              pytest.mark.slow]

SRC = str(Path(dialogue.__file__).resolve().parents[1])

# Starts four processes that each get away from the kernel in their own way, and prints their
# pids as JSON. `sleep 600` so that any survivor is plainly a leak.
ESCAPE = textwrap.dedent(r'''
    import json, os, subprocess, tempfile, time
    def _pid_from(path):
        for _ in range(500):
            try:
                text = open(path).read().strip()
                if text:
                    return int(text)
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError("no pid in " + path)
    _d = tempfile.mkdtemp()
    pids = {}
    pids["new_session"] = subprocess.Popen(["sleep", "600"], start_new_session=True).pid
    pids["plain"] = subprocess.Popen(["sleep", "600"]).pid
    # setsid double fork: the shell that started it exits, the sleep is left in its own session
    subprocess.run(["sh", "-c", f"setsid sh -c 'sleep 600 & echo $! > {_d}/setsid' >/dev/null 2>&1 &"],
                   check=True)
    pids["setsid_double_fork"] = _pid_from(f"{_d}/setsid")
    out = subprocess.run(["sh", "-c", "nohup sleep 600 >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True).stdout
    pids["nohup"] = int(out.split()[-1])
    print(json.dumps(pids))
''')


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: list[int], limit: float = 20.0) -> list[int]:
    """The pids still alive after polling for up to `limit` seconds (a bound, not a timing)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def cgroup_possible() -> bool:
    cg = CGroup.create()
    if cg is None:
        return False
    cg.remove()
    return True


MODES = ["auto", "subreaper"]


def kernel_env(mode: str) -> dict[str, str]:
    return {DISABLE_CGROUP_ENV: "1"} if mode == "subreaper" else {}


def expected_containment(mode: str) -> str:
    return "cgroup" if mode == "auto" and cgroup_possible() else "subreaper"


async def start_escapees(k: Kernel) -> dict[str, int]:
    res = await k.run(ESCAPE)
    assert res.ok, res.message + str(res.outputs)
    pids = json.loads(res.outputs[0]["text"])
    assert len(pids) == 4 and all(alive(p) for p in pids.values()), pids
    # they really did get away: none of them is in the kernel's process group any more, except
    # the plain child (which the old process-group kill already reached)
    kgroup = os.getpgid(k.pid)
    assert os.getpgid(pids["new_session"]) != kgroup
    assert os.getpgid(pids["setsid_double_fork"]) != kgroup
    return pids


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["restart", "shutdown", "kernel_exits"])
async def test_escaped_processes_end_with_the_kernel(mode: str, how: str):
    k = Kernel(env=kernel_env(mode))
    try:
        await k.start()
        assert k.containment == expected_containment(mode)
        assert k.supervisor_pid != k.pid and psutil.Process(k.pid).ppid() == k.supervisor_pid
        pids = await start_escapees(k)
        old = k.pid
        if how == "restart":
            await k.restart()
            assert k.is_alive and k.pid != old
        elif how == "shutdown":
            await k.shutdown()
        else:
            res = await k.run("import os; os._exit(3)")
            assert res.status == "died" and "exited with status 3" in res.message
        left = wait_gone(list(pids.values()) + [old])
        assert left == [], {n: p for n, p in pids.items() if p in left}
        if how == "restart":  # the fresh kernel works, and so does ending it again
            assert (await k.run("6 * 7")).outputs[0]["data"]["text/plain"] == "42"
    finally:
        await k.shutdown()


async def test_a_killed_supervisor_leaves_nothing_in_its_cgroup():
    """The last resort: the supervisor itself is SIGKILLed (it cannot clean up). The kernel
    notices its parent is gone and exits; the processes it started are still in the cgroup,
    and the app ends them when it notices the kernel died."""
    if not cgroup_possible():
        pytest.skip("no writable cgroup v2 here")
    k = Kernel()
    try:
        await k.start()
        assert k.containment == "cgroup"
        pids = await start_escapees(k)
        cg = k._tree.info["cgroup"]
        os.kill(k.supervisor_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while k.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not k.is_alive
        res = await k.run("'fresh'")  # clears the dead kernel away, then starts a new one
        assert res.ok
        assert wait_gone(list(pids.values())) == []
        assert not os.path.exists(cg)
    finally:
        await k.shutdown()


# A server-like process: the service runs the escaping cell, prints the pids, and waits to be
# killed with SIGKILL (no exit hook, no signal handler runs).
SERVER = textwrap.dedent('''
    import asyncio, json, os, sys, time
    from dialogue.service import DialogueService
    async def main():
        svc = DialogueService(sys.argv[1])
        svc.create("d")
        m = svc.add("d", "code", sys.stdin.readline() and open(sys.argv[2]).read())
        r = await svc.run("d", m.id)
        k = svc.kernels.peek(svc.dialogue_id("d"))
        pids = json.loads(r.outputs[0]["text"])
        pids["kernel"], pids["supervisor"] = k.pid, k.supervisor_pid
        print(json.dumps({"pids": pids, "dir": k._dir, "containment": k.containment}), flush=True)
        time.sleep(600)
    asyncio.run(main())
''')


@pytest.mark.parametrize("mode", MODES)
def test_nothing_outlives_a_sigkilled_server(tmp_path: Path, mode: str):
    script, cell = tmp_path / "server.py", tmp_path / "cell.py"
    script.write_text(SERVER)
    cell.write_text(ESCAPE)
    env = {**os.environ, "PYTHONPATH": SRC, **kernel_env(mode)}
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s.db"), str(cell)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        p.stdin.write("go\n")
        p.stdin.flush()
        line = p.stdout.readline()
        assert line, "the server did not report its processes"
        report = json.loads(line)
        pids = report["pids"]
        assert report["containment"] == expected_containment(mode)
        assert all(alive(pid) for pid in pids.values())
    finally:
        p.kill()  # SIGKILL: nothing in the server runs any more
        p.wait(30)
    left = wait_gone(list(pids.values()))
    assert left == [], {n: pid for n, pid in pids.items() if pid in left}


async def test_the_next_start_ends_the_cgroup_of_a_server_and_supervisor_both_killed(tmp_path: Path):
    """Server and supervisor both SIGKILLed (nothing of ours ran): the processes are still in
    the kernel's cgroup, and the next kernel start anywhere sweeps them with the directory."""
    cg = CGroup.create()
    if cg is None:
        pytest.skip("no writable cgroup v2 here")
    leftover = subprocess.Popen(["sleep", "600"], start_new_session=True, preexec_fn=cg.join)
    cg.close_fd()
    dead = subprocess.Popen(["true"])
    dead.wait()
    d = Path(tempfile.mkdtemp(prefix="dialogue-k-"))
    (d / "owner").write_text(str(dead.pid))
    (d / "supervisor.json").write_text(json.dumps({"cgroup": cg.path}))
    try:
        async with Kernel():
            pass
        assert wait_gone([leftover.pid]) == []
        assert not os.path.exists(cg.path) and not d.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
        leftover.wait(10)
        cg.remove()
