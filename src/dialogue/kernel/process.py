"""Launching a kernel so that nothing it starts outlives it or the app.

Each kernel runs under a small supervisor process (`supervisor.py`) that holds it and everything
it starts in one group the app can always end: on Linux a cgroup v2 of its own where one can be
created (root, or a delegated subtree), else the supervisor is a child subreaper that adopts
every orphaned descendant, so a `Popen(..., start_new_session=True)`, a `setsid` double fork or
`nohup cmd &` is ended with the kernel. Elsewhere (macOS, BSD) only the kernel's process group is
ended: a process that made its own session survives there (`Kernel.containment` says which
guarantee a kernel has). The whole group is ended when the kernel exits, is restarted or shut
down; at interpreter exit and on SIGTERM/SIGHUP (a registry of live kernels, `LIVE`); and when
the app dies, even by SIGKILL (the supervisor's stdin is a pipe only the app can write to, so EOF
means the app is gone).

The kernel itself runs `inside/launcher.py`, listening on IPC sockets in a private 0700
directory (`private_dir`), never on TCP, so no other local user can reach it.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from . import inside
from .supervisor import CGroup

__all__ = ["Tree", "Specs", "INFO", "LIVE", "LIVE_LOCK", "private_dir", "end_tree", "install_hooks",
           "kill_all_sync", "sweep_stale", "death_message"]

SUPERVISOR = str(Path(__file__).with_name("supervisor.py"))
INFO = "supervisor.json"  # in the private directory: what the supervisor reports
MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS; keep a margin


def private_dir() -> str:
    """A fresh 0700 directory for one kernel's sockets, connection file and log, marked with
    this process's pid so a later app can tell a dead owner's directory (`sweep_stale`)."""
    sweep_stale()
    d = tempfile.mkdtemp(prefix="dialogue-k-")  # mkdtemp makes it 0700
    if len(d) + 8 > MAX_SOCKET_PATH:
        shutil.rmtree(d, ignore_errors=True)
        d = tempfile.mkdtemp(prefix="dialogue-k-", dir="/tmp")
    Path(d, "owner").write_text(str(os.getpid()))
    return d

@dataclass(eq=False)
class Tree:
    """A kernel's supervisor and what the app needs to end it and all it started."""

    proc: subprocess.Popen  # the supervisor (jupyter_client's provisioner holds the same object)
    dir: str  # the kernel's private directory
    pipe: int | None = None  # write end of the supervisor's stdin: closed when this process dies
    info: dict[str, Any] = field(default_factory=dict)

    def load_info(self) -> dict[str, Any]:
        """What the supervisor reported ({} until it has): the kernel's pid, the containment."""
        if not self.info:
            with contextlib.suppress(OSError, ValueError):
                self.info = json.loads(Path(self.dir, INFO).read_text())
        return self.info

    @property
    def done(self) -> bool:
        return self.proc.poll() is not None

    def ask_end(self) -> None:
        """SIGTERM to the supervisor: it SIGKILLs the kernel and every process it started, waits
        until they are gone, then exits."""
        if not self.done:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def force(self) -> None:
        """What the supervisor should have done, for one that does not end (stuck, or stopped
        with SIGSTOP): SIGKILL the kernel's process group, its cgroup and the supervisor."""
        info = self.load_info()
        kp = info.get("kernel_pid")
        if kp and not self.done:  # (its own child: not reused unless it was reaped just now)
            for kill in (os.killpg, os.kill):
                try:
                    kill(kp, signal.SIGKILL)
                except OSError:
                    pass
        if info.get("cgroup"):
            CGroup(info["cgroup"]).kill()
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass

    def finish(self) -> None:
        """After the supervisor exited: make sure its cgroup is gone too (it removes it itself
        unless it was killed), and close our end of its pipe."""
        cg = self.info.get("cgroup")
        if cg and os.path.isdir(cg):
            group = CGroup(cg)
            end = time.monotonic() + 2.0
            while group.populated() and time.monotonic() < end:
                group.kill()
                time.sleep(0.01)
            group.remove()
        if self.pipe is not None:
            with contextlib.suppress(OSError):
                os.close(self.pipe)
            self.pipe = None


# pid of the supervisor -> its tree. Kept outside the Kernel objects so the exit hooks can end
# kernels synchronously whatever state the event loop is in.
LIVE: dict[int, Tree] = {}
LIVE_LOCK = threading.RLock()  # re-entrant: a signal handler may run while the main thread holds it
_hooks_installed = False
END_WAIT = 6.0  # seconds a supervisor gets to end its tree (it gives up itself after 5)


def kill_all_sync(grace: float = END_WAIT) -> None:
    """End every kernel this process started, and all they started. Runs at exit and from
    signal handlers, so it uses only os-level calls."""
    with LIVE_LOCK:
        live = list(LIVE.values())
        LIVE.clear()
    for t in live:
        t.ask_end()
    end = time.monotonic() + grace
    for t in live:
        while not t.done and time.monotonic() < end:
            time.sleep(0.02)
        if not t.done:
            t.force()
            with contextlib.suppress(subprocess.TimeoutExpired):
                t.proc.wait(1)
        t.finish()
        shutil.rmtree(t.dir, ignore_errors=True)


def sweep_stale() -> None:
    """Remove private directories left by servers that were killed outright (SIGKILL): their
    supervisors ended the kernels, but nothing could remove the directories. A cgroup whose
    supervisor was killed too is ended here."""
    roots = {tempfile.gettempdir(), "/tmp"}
    for root in roots:
        for d in glob.glob(os.path.join(root, "dialogue-k-*")):
            try:
                if os.stat(d).st_uid != os.getuid():
                    continue
                owner = int(Path(d, "owner").read_text())
            except (OSError, ValueError):
                continue
            if owner == os.getpid():
                continue
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    cg = json.loads(Path(d, INFO).read_text()).get("cgroup")
                    if cg and os.path.isdir(cg) and os.path.basename(cg).startswith("dialogue-k-"):
                        group = CGroup(cg)
                        group.kill()
                        time.sleep(0.05)
                        group.remove()
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass


async def end_tree(tree: Tree, wait: float = END_WAIT) -> None:
    """End the kernel and all it started, and wait until they are gone: the next liveness check
    must not see the kernel alive, and a restart must not overlap the old kernel's processes."""
    tree.ask_end()
    end = time.monotonic() + wait
    while not tree.done and time.monotonic() < end:
        await asyncio.sleep(0.02)
    if not tree.done:
        tree.force()
        end = time.monotonic() + 2.0
        while not tree.done and time.monotonic() < end:
            await asyncio.sleep(0.02)
    tree.finish()


def _on_signal(signum: int, frame: Any) -> None:
    kill_all_sync()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_hooks() -> None:
    """atexit covers normal exits and exits through SystemExit/KeyboardInterrupt; SIGTERM and
    SIGHUP, which by default end the process without running atexit, get a handler that cleans
    up and then dies by the same signal. A handler someone else installed is left alone (servers
    like uvicorn turn SIGTERM into a normal exit, which runs atexit)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(kill_all_sync)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)


class Specs(KernelSpecManager):
    """The kernel a dialogue chose (`specs.Choice`; by default this interpreter's ipykernel, even
    where a `python3` kernelspec installed by the user in ~/.local/share/jupyter points at another
    environment), always run under the supervisor."""

    python: str = sys.executable
    choice: Any = None  # a specs.Choice; None: `python`'s ipykernel
    info: str = ""  # where the supervisor reports; the kernel runs under it (see the module doc)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        from .specs import Choice, kernel_argv
        kernel, env, interrupt, language = kernel_argv(self.choice or Choice(python=self.python),
                                                       inside.path("launcher"))
        # The supervisor needs only the standard library: this interpreter, isolated (-I) and
        # without site (-S), starts in milliseconds whatever the kernel's environment.
        return KernelSpec(argv=[sys.executable, "-I", "-S", SUPERVISOR, "--info", self.info,
                                "--", *kernel], env=env,
                          display_name="Python 3 (dialogue)", language=language,
                          interrupt_mode=interrupt)


def death_message(code: int | None, reason: str | None) -> str:
    """What a run tells the user when the kernel process ended under it (`reason`: the app
    ended it, and why)."""
    if reason:
        what = reason
    elif code is None:
        what = "The kernel stopped"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = f"The kernel was killed by {name}"
        if -code == signal.SIGKILL:
            what += " (often: it ran out of memory)"
    else:
        what = f"The kernel exited with status {code}"
    return f"{what}; its variables are lost. The next run starts a fresh kernel."
