"""A live IPython kernel per dialogue.

Code messages run in an ipykernel subprocess driven through `jupyter_client`'s asynchronous API.
The kernel listens on IPC (Unix sockets) in a private 0700 directory, never on TCP, so no other
local user can reach it. Outputs come back in nbformat shape, as they arrive, capped in size. A
kernel that dies is noticed by polling its process, the run says so, and the next run starts a
fresh kernel.

Nothing a kernel starts outlives the kernel or the app. Each kernel runs under a small supervisor
process (`kernel_supervisor.py`) that holds it and everything it starts in one group the app can
always end: on Linux a cgroup v2 of its own where one can be created (root, or a delegated
subtree), else the supervisor is a child subreaper that adopts every orphaned descendant, so a
`Popen(..., start_new_session=True)`, a `setsid` double fork or `nohup cmd &` is ended with the
kernel. Elsewhere (macOS, BSD) only the kernel's process group is ended: a process that made its
own session survives there (`Kernel.containment` says which guarantee a kernel has). The whole
group is ended when the kernel exits, is restarted or shut down; at interpreter exit and on
SIGTERM/SIGHUP (a registry of live kernels); and when the app dies, even by SIGKILL (the
supervisor's stdin is a pipe only the app can write to, so EOF means the app is gone).

Public API::

    k = Kernel(cwd=..., output_cap=1_000_000)
    await k.start()                         # optional: every run starts the kernel when needed
    ex = k.execute(code, timeout=30)        # Execution: `async for out in ex` streams outputs
    res = await ex                          # RunResult(outputs, execution_count, status, message)
    res = await k.run(code, timeout=30)     # the same in one call
    await k.interrupt(); await k.restart(); await k.shutdown()
    await k.eval("df.shape") -> str         # text/plain of an expression, for $`expr`
    await k.shell("ls") -> str              # a shell command's output, for !`cmd`
    await k.call(code, expr) -> str | None  # silent code, then one expression's text (tools)
    k.is_alive, k.busy, k.last_used, k.pid, k.containment

    pool = KernelPool(idle_timeout=3600)    # dialogue id -> Kernel
    k = await pool.get(dialogue_id); await pool.shutdown_all()

    async for msg, res in run_all(kernel, dialogue, above=msg_id): ...   # "run all (above)"

A Kernel belongs to the event loop it first ran in (its ZeroMQ sockets do).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Sequence

from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from .document import Dialogue, Kind, Message

__all__ = [
    "Kernel", "KernelPool", "Execution", "RunResult", "Status", "run_all",
    "KernelError", "KernelStartError", "KernelDied", "KernelTimeout", "ExecutionError",
    "DEFAULT_OUTPUT_CAP",
]

DEFAULT_OUTPUT_CAP = 1_000_000
"""Characters of output kept per run. Beyond it outputs are counted and dropped as they arrive,
so a cell that prints 100 MB costs the server the message in hand (ipykernel batches prints into
messages of a few MB), not 100 MB."""

_POLL = 0.2  # seconds between liveness checks while waiting on the kernel
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS; keep a margin

Status = Literal["ok", "error", "timeout", "died", "interrupted"]


# ---------------------------------------------------------------- errors

class KernelError(RuntimeError):
    """The kernel could not do what was asked; the message says why in words a user can act on."""


class KernelStartError(KernelError):
    pass


class KernelDied(KernelError):
    pass


class KernelTimeout(KernelError):
    pass


class ExecutionError(KernelError):
    """Code or an expression raised inside the kernel. Carries the exception's name, value and
    (ANSI-coloured) traceback lines as the kernel reported them."""

    def __init__(self, ename: str, evalue: str, traceback: list[str] | None = None):
        super().__init__(f"{ename}: {evalue}")
        self.ename, self.evalue, self.traceback = ename, evalue, list(traceback or [])


# ---------------------------------------------------------------- results

@dataclass
class RunResult:
    """What one run of a code message produced.

    `outputs` are nbformat v4 outputs (consecutive stream chunks of the same stream merged).
    `status`: ok | error (the code raised) | timeout | died (the kernel process ended) |
    interrupted. `message` says in words what happened when status is not ok. `truncated` counts
    the characters cut by the output cap (a note saying so is the last output)."""

    outputs: list[dict[str, Any]] = field(default_factory=list)
    execution_count: int | None = None
    status: Status = "ok"
    message: str = ""
    truncated: int = 0
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _size(v: Any) -> int:
    if isinstance(v, str):
        return len(v)
    if isinstance(v, list):
        return sum(_size(x) for x in v)
    if isinstance(v, dict):
        return len(json.dumps(v))
    return len(str(v))


class _Outputs:
    """Turns IOPub messages into nbformat outputs, under a size cap.

    nbformat.v4.output_from_msg builds the same dicts but validates each one against the
    notebook JSON schema, which costs more than the rest of the path for a chatty cell; the
    shapes are fixed and small, so they are built here and validated once in the tests."""

    def __init__(self, cap: int):
        self.cap = cap
        self.kept = 0
        self.cut = 0
        self.outputs: list[dict[str, Any]] = []
        self._chunks: dict[int, list[str]] = {}  # index of a stream output -> its text chunks
        self._display: dict[str, list[int]] = {}  # display_id -> indexes of its outputs
        self._clear_pending = False

    def _room(self) -> int:
        return max(0, self.cap - self.kept)

    def _clear(self) -> None:
        self.outputs.clear()
        self._chunks.clear()
        self._display.clear()
        self.kept = 0

    def add(self, msg_type: str, content: dict[str, Any]) -> list[dict[str, Any]]:
        """Record one message; return what to show now (outputs, or the control items
        `clear_output` / `update_display_data`, which surfaces apply and never store)."""
        if msg_type == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
                return []
            self._clear()
            return [{"output_type": "clear_output"}]
        if msg_type == "update_display_data":
            did = (content.get("transient") or {}).get("display_id")
            idxs = self._display.get(did or "", [])
            size = _size(content.get("data", {}))
            if not idxs or size > self._room():
                self.cut += size if idxs else 0
                return []
            for i in idxs:
                self.outputs[i]["data"] = content.get("data", {})
                self.outputs[i]["metadata"] = content.get("metadata", {})
            return [{"output_type": "update_display_data", "display_id": did,
                     "data": content.get("data", {}), "metadata": content.get("metadata", {})}]
        if msg_type not in ("stream", "execute_result", "display_data", "error"):
            return []
        shown: list[dict[str, Any]] = []
        if self._clear_pending:
            self._clear_pending = False
            self._clear()
            shown.append({"output_type": "clear_output"})
        if msg_type == "stream":
            text = content.get("text", "")
            room = self._room()
            if len(text) > room:
                self.cut += len(text) - room
                text = text[:room]
            if not text:
                return shown
            self.kept += len(text)
            name = content.get("name", "stdout")
            last = len(self.outputs) - 1
            prev = self.outputs[last] if last >= 0 else {}
            if prev.get("output_type") == "stream" and prev.get("name") == name:
                self._chunks[last].append(text)
            else:
                self.outputs.append({"output_type": "stream", "name": name, "text": ""})
                self._chunks[len(self.outputs) - 1] = [text]
            shown.append({"output_type": "stream", "name": name, "text": text})
            return shown
        if msg_type == "error":
            # Always kept: the traceback is what tells the user what went wrong. Only an absurd
            # traceback is shortened, keeping its end (where the exception is).
            tb = list(content.get("traceback", []))
            while len(tb) > 1 and _size(tb) > max(self._room(), 100_000):
                self.cut += len(tb[0])
                tb.pop(0)
            out = {"output_type": "error", "ename": content.get("ename", ""),
                   "evalue": content.get("evalue", ""), "traceback": tb}
            self.kept += _size(tb)
        else:
            data, meta = content.get("data", {}), content.get("metadata", {})
            size = _size(data)
            if size > self._room():
                self.cut += size
                return shown
            self.kept += size
            out = {"output_type": msg_type, "data": data, "metadata": meta}
            if msg_type == "execute_result":
                out["execution_count"] = content.get("execution_count")
            did = (content.get("transient") or {}).get("display_id")
            if did:
                self._display.setdefault(did, []).append(len(self.outputs))
                # Shown with its display id so a surface can apply later updates; stored without
                # (nbformat has no place for it).
                self.outputs.append(out)
                shown.append({**out, "transient": {"display_id": did}})
                return shown
        self.outputs.append(out)
        shown.append(out)
        return shown

    def finish(self) -> list[dict[str, Any]]:
        """Join stream chunks; append the note on what the cap cut (also returned, to show)."""
        for i, chunks in self._chunks.items():
            if i < len(self.outputs):
                self.outputs[i]["text"] = "".join(chunks)
        self._chunks.clear()
        if not self.cut:
            return []
        note = {"output_type": "stream", "name": "stderr",
                "text": f"\n[output capped: kept {self.kept:,} characters, cut {self.cut:,}]\n"}
        self.outputs.append(note)
        return [note]


# ---------------------------------------------------------------- kernel-side helpers

# Installed into the kernel as the private module `_dialogue_kernel` (never in the user's
# namespace). `Raw` makes a string display as itself, so `call` gets text back verbatim instead
# of a repr that would have to be parsed.
_KERNEL_HELPERS = r'''
import subprocess as _subprocess

class Raw(str):
    def __repr__(self):
        return str(self)
    def _repr_pretty_(self, p, cycle):
        p.text(str(self))

def shell(cmd, timeout, limit):
    try:
        r = _subprocess.run(cmd, shell=True, stdin=_subprocess.DEVNULL, stdout=_subprocess.PIPE,
                            stderr=_subprocess.STDOUT, timeout=timeout)
    except _subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        return Raw(out[:limit] + f"\n[command timed out after {timeout} s]")
    out = r.stdout.decode(errors="replace")
    if len(out) > limit:
        out = out[:limit] + f"\n[output cut: {len(out) - limit:,} more characters]"
    if r.returncode:
        out += ("" if out.endswith("\n") or not out else "\n") + f"[exit status {r.returncode}]"
    return Raw(out)
'''


def _install_code(module: str, source: str) -> str:
    """Code that (re)creates `module` in the kernel's sys.modules from `source`. It binds one
    unlikely name in the user's namespace and deletes it again, so the user's variables are
    untouched."""
    digest = hashlib.sha1(source.encode()).hexdigest()
    return (
        "def __dialogue_install():\n"
        "    import sys, types\n"
        f"    m = sys.modules.get({module!r})\n"
        f"    if m is None or getattr(m, '__digest__', None) != {digest!r}:\n"
        f"        m = types.ModuleType({module!r})\n"
        f"        m.__digest__ = {digest!r}\n"
        f"        exec(compile({source!r}, '<{module}>', 'exec'), m.__dict__)\n"
        f"        sys.modules[{module!r}] = m\n"
        "__dialogue_install()\n"
        "del __dialogue_install\n"
    )


# ---------------------------------------------------------------- orphan protection

_SUPERVISOR = str(Path(__file__).with_name("kernel_supervisor.py"))
_INFO = "supervisor.json"  # in the private directory: what the supervisor reports


@dataclass(eq=False)
class _Tree:
    """A kernel's supervisor and what the app needs to end it and all it started."""

    proc: subprocess.Popen  # the supervisor (jupyter_client's provisioner holds the same object)
    dir: str  # the kernel's private directory
    pipe: int | None = None  # write end of the supervisor's stdin: closed when this process dies
    info: dict[str, Any] = field(default_factory=dict)

    def load_info(self) -> dict[str, Any]:
        """What the supervisor reported ({} until it has): the kernel's pid, the containment."""
        if not self.info:
            with contextlib.suppress(OSError, ValueError):
                self.info = json.loads(Path(self.dir, _INFO).read_text())
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
            from .kernel_supervisor import CGroup
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
            from .kernel_supervisor import CGroup
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
_LIVE: dict[int, _Tree] = {}
_LIVE_LOCK = threading.RLock()  # re-entrant: a signal handler may run while the main thread holds it
_hooks_installed = False
_END_WAIT = 6.0  # seconds a supervisor gets to end its tree (it gives up itself after 5)


def _kill_all_sync(grace: float = _END_WAIT) -> None:
    """End every kernel this process started, and all they started. Runs at exit and from
    signal handlers, so it uses only os-level calls."""
    with _LIVE_LOCK:
        live = list(_LIVE.values())
        _LIVE.clear()
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


def _sweep_stale() -> None:
    """Remove private directories left by servers that were killed outright (SIGKILL): their
    supervisors ended the kernels, but nothing could remove the directories. A cgroup whose
    supervisor was killed too is ended here."""
    import glob
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
                    cg = json.loads(Path(d, _INFO).read_text()).get("cgroup")
                    if cg and os.path.isdir(cg) and os.path.basename(cg).startswith("dialogue-k-"):
                        from .kernel_supervisor import CGroup
                        group = CGroup(cg)
                        group.kill()
                        time.sleep(0.05)
                        group.remove()
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:
                pass


async def _end_tree(tree: _Tree, wait: float = _END_WAIT) -> None:
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
    _kill_all_sync()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    """atexit covers normal exits and exits through SystemExit/KeyboardInterrupt; SIGTERM and
    SIGHUP, which by default end the process without running atexit, get a handler that cleans
    up and then dies by the same signal. A handler someone else installed is left alone (servers
    like uvicorn turn SIGTERM into a normal exit, which runs atexit)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_kill_all_sync)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)


# What the kernel process runs: ipykernel_launcher, except that ipykernel's pipe for output from
# forked subprocesses (multiprocessing with fork) listens on an IPC socket in the kernel's private
# directory instead of a random TCP port on 127.0.0.1, which any local user could connect to.
# ipykernel has no setting for that pipe, so its two setup methods are replaced; if a future
# ipykernel renames them, the patch is skipped and the kernel runs unchanged.
_LAUNCHER = r"""
import os, sys
def _patch_pipe(private_dir):
    import zmq
    from zmq.eventloop.zmqstream import ZMQStream
    from ipykernel.iostream import IOPubThread
    if not (hasattr(IOPubThread, "_setup_pipe_in") and hasattr(IOPubThread, "_setup_pipe_out")):
        return
    addr = "ipc://" + os.path.join(private_dir, "iopub-pipe")
    def _setup_pipe_in(self):
        self._pipe_uuid = os.urandom(16)
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        pipe_in.bind(addr)
        self._pipe_in = ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)
    def _setup_pipe_out(self):
        ctx = zmq.Context()
        pipe_out = ctx.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect(addr)
        return ctx, pipe_out
    IOPubThread._setup_pipe_in = _setup_pipe_in
    IOPubThread._setup_pipe_out = _setup_pipe_out
try:
    _patch_pipe(os.path.dirname(os.path.abspath(sys.argv[sys.argv.index("-f") + 1])))
except Exception:
    pass
if sys.path and (sys.path[0] == "" or os.path.abspath(sys.path[0]) == os.getcwd()):
    del sys.path[0]  # as ipykernel_launcher does; IPython puts the cwd back
from ipykernel import kernelapp
kernelapp.launch_new_instance()
"""


class _Specs(KernelSpecManager):
    """Always this interpreter's ipykernel: a `python3` kernelspec installed by the user in
    ~/.local/share/jupyter could otherwise point at another environment."""

    python: str = sys.executable
    info: str = ""  # where the supervisor reports; the kernel runs under it (see the module doc)

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        kernel = [self.python, "-Xfrozen_modules=off", "-c", _LAUNCHER, "-f", "{connection_file}"]
        # The supervisor needs only the standard library: this interpreter, isolated (-I) and
        # without site (-S), starts in milliseconds whatever the kernel's environment.
        return KernelSpec(argv=[sys.executable, "-I", "-S", _SUPERVISOR, "--info", self.info,
                                "--", *kernel],
                          display_name="Python 3 (dialogue)", language="python",
                          interrupt_mode="signal")


def _death_message(code: int | None, reason: str | None) -> str:
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


# ---------------------------------------------------------------- the kernel

class Kernel:
    """One IPython kernel process, started on first use.

    Runs are serialized: a second `execute` waits for the first. `interrupt`, `restart` and
    `shutdown` act at once, even while a run is in progress."""

    def __init__(self, *, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                 output_cap: int = DEFAULT_OUTPUT_CAP, python: str | None = None,
                 startup_timeout: float = 60.0, interrupt_grace: float = 5.0, name: str = ""):
        if output_cap < 0:
            raise ValueError(f"output_cap must be >= 0, got {output_cap}")
        self.cwd = str(cwd) if cwd is not None else os.getcwd()
        if not os.path.isdir(self.cwd):
            raise ValueError(f"kernel working directory {self.cwd!r} does not exist")
        self.env = dict(env or {})
        self.output_cap = output_cap
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.interrupt_grace = interrupt_grace
        self.name = name
        self.last_used = time.monotonic()
        self.generation = 0  # how many kernel processes this object has started
        self._km: AsyncKernelManager | None = None
        self._kc: Any = None
        self._dir: str | None = None
        self._tree: _Tree | None = None
        self._log: Any = None
        self._stop_reason: str | None = None
        self._run_lock = asyncio.Lock()
        self._life_lock = asyncio.Lock()
        self._current: asyncio.Task | None = None
        self._current_msg: str | None = None
        self._interrupted: set[str] = set()
        self._modules: dict[str, str] = {}

    # ------------------------------------------------------------ state

    @property
    def _proc(self) -> subprocess.Popen | None:
        """The kernel's supervisor, which exits as the kernel exits (with its status)."""
        return self._tree.proc if self._tree is not None else None

    @property
    def is_alive(self) -> bool:
        """The kernel process exists and has not exited."""
        p = self._proc
        return p is not None and p.poll() is None

    @property
    def pid(self) -> int | None:
        """The kernel process's pid (its supervisor's is `supervisor_pid`)."""
        t = self._tree
        return t.info.get("kernel_pid") if t is not None else None

    @property
    def supervisor_pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None else None

    @property
    def containment(self) -> str | None:
        """How everything the kernel starts is held, so it can be ended with it: "cgroup"
        (Linux, a cgroup v2 of its own), "subreaper" (Linux: the supervisor adopts orphans),
        or "process-group" (elsewhere: a process that starts its own session escapes).
        None before the kernel starts."""
        t = self._tree
        return t.info.get("containment") if t is not None else None

    @property
    def busy(self) -> bool:
        return self._run_lock.locked()

    def __repr__(self) -> str:
        state = "busy" if self.busy else "alive" if self.is_alive else "stopped"
        return f"<Kernel {self.name or ''} pid={self.pid} {state}>"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the kernel process unless it is already running. Every run does this itself;
        calling it early hides the ~1 s start from the first run."""
        if self._km is not None and self.is_alive:
            return
        # The run lock too: starting talks to the kernel, and only one task may read its replies.
        async with self._run_lock:
            async with self._life_lock:
                await self._start_locked()

    async def _start_locked(self) -> None:
        if self._km is not None and self.is_alive:
            if "_dialogue_kernel" not in self._modules:  # a start that was cancelled midway
                await self._install("_dialogue_kernel", _KERNEL_HELPERS)
            return
        if self._km is not None:  # a dead kernel: clear it away first
            await self._stop_locked(now=True)
        _install_hooks()
        _sweep_stale()
        d = tempfile.mkdtemp(prefix="dialogue-k-")  # mkdtemp makes it 0700
        if len(d) + 8 > _MAX_SOCKET_PATH:
            shutil.rmtree(d, ignore_errors=True)
            d = tempfile.mkdtemp(prefix="dialogue-k-", dir="/tmp")
        Path(d, "owner").write_text(str(os.getpid()))
        specs = _Specs()
        specs.python = self.python
        specs.info = os.path.join(d, _INFO)
        km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=specs, transport="ipc",
                                ip=os.path.join(d, "k"), connection_file=os.path.join(d, "kernel.json"),
                                shutdown_wait_time=1.0)
        env = {**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1", **self.env}
        self._log = open(os.path.join(d, "kernel.log"), "wb")
        # The supervisor's stdin: only this process holds the write end (os.pipe fds are not
        # inherited by other children), so the supervisor reads EOF exactly when we are gone.
        r, w = os.pipe()
        try:
            await km.start_kernel(
                cwd=self.cwd, env=env, stdin=r, stdout=self._log, stderr=subprocess.STDOUT,
                extra_arguments=["--HistoryManager.enabled=False"])
        except Exception as e:
            os.close(w)
            self._log.close()
            shutil.rmtree(d, ignore_errors=True)
            raise KernelStartError(f"could not start a Python kernel with {self.python}: {e}") from e
        finally:
            os.close(r)
        tree = _Tree(km.provisioner.process, d, w)
        with _LIVE_LOCK:
            _LIVE[tree.proc.pid] = tree
        self._km, self._dir, self._tree = km, d, tree
        kc = km.client()
        kc.start_channels()
        self._kc = kc
        try:
            await kc.wait_for_ready(timeout=self.startup_timeout)
            end = time.monotonic() + 10  # written before the kernel started: at once
            while not tree.load_info() and not tree.done and time.monotonic() < end:
                await asyncio.sleep(0.01)
        except Exception as e:
            tail = self._log_tail()
            error = tree.load_info().get("error")
            await self._stop_locked(now=True)
            if error:  # the supervisor could not start the kernel (no such python, ...)
                raise KernelStartError(f"could not start a Python kernel with {self.python}: "
                                       f"{error}") from e
            raise KernelStartError(f"the Python kernel did not come up ({e})"
                                   + (f"; its log ends:\n{tail}" if tail else "")) from e
        if tree.info.get("error"):  # (the kernel died before answering: wait_for_ready said so)
            await self._stop_locked(now=True)
            raise KernelStartError(f"could not start a Python kernel with {self.python}: "
                                   f"{tree.info['error']}")
        self._stop_reason = None
        self._modules = {}
        self.generation += 1
        self.last_used = time.monotonic()
        await self._install("_dialogue_kernel", _KERNEL_HELPERS)

    def _log_tail(self, n: int = 2000) -> str:
        if not self._dir:
            return ""
        try:
            data = Path(self._dir, "kernel.log").read_bytes()[-n:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()

    async def shutdown(self) -> None:
        """Stop the kernel process (politely when it is idle, at once when it is busy) and
        remove its private directory. A run in progress ends with status 'died'. The object can
        be used again: the next run starts a fresh kernel."""
        await self._stop(reason="The kernel was shut down")

    async def restart(self) -> None:
        """A fresh kernel with empty variables, in place of the current one."""
        await self._stop(reason="The kernel was restarted")
        await self.start()

    async def _stop(self, reason: str) -> None:
        async with self._life_lock:
            # Set under the lock: a start in progress would otherwise clear it.
            self._stop_reason = reason
            await self._stop_locked(now=self.busy)

    async def _stop_locked(self, now: bool) -> None:
        km, kc, d, tree = self._km, self._kc, self._dir, self._tree
        if km is None:
            return
        if tree is not None and not now and not tree.done:
            # Politely first: the kernel runs its exit handlers, then its supervisor ends what
            # it left running and exits.
            with contextlib.suppress(Exception):
                await km.request_shutdown()
                end = time.monotonic() + km.shutdown_wait_time
                while not tree.done and time.monotonic() < end:
                    await asyncio.sleep(0.02)
        if tree is not None:
            await _end_tree(tree)
        # Not jupyter_client's own shutdown sequence: its last resort SIGKILLs the supervisor,
        # which would leave the kernel's processes to init. Here the process is gone already,
        # and this only clears jupyter_client's state (connection file, sockets).
        with contextlib.suppress(Exception):
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        # let a run in progress see the process gone before its sockets close
        cur = self._current
        if (cur is not None and self._current_msg is not None and not cur.done()
                and cur is not asyncio.current_task()):
            await asyncio.wait([cur], timeout=5)
        if kc is not None:
            kc.stop_channels()
        if self._log is not None:
            self._log.close()
            self._log = None
        if tree is not None:
            with _LIVE_LOCK:
                _LIVE.pop(tree.proc.pid, None)
        if d:
            shutil.rmtree(d, ignore_errors=True)
        self._km = self._kc = self._dir = self._tree = None
        self._modules = {}

    async def interrupt(self) -> None:
        """Interrupt the running cell (KeyboardInterrupt in the kernel); its variables stay.
        Does nothing when no cell is running."""
        msg = self._current_msg
        if msg is None or self._km is None or not self.is_alive:
            return
        self._interrupted.add(msg)
        await self._km.interrupt_kernel()

    async def __aenter__(self) -> "Kernel":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    # ------------------------------------------------------------ running code

    def execute(self, code: str, *, timeout: float | None = None) -> "Execution":
        """Run `code` as a cell. Iterate the result for outputs as they arrive; await it for the
        RunResult. The run proceeds whether or not anyone iterates."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        ex = Execution(self)
        task = asyncio.get_running_loop().create_task(self._execute(code, timeout, ex))
        ex._task = task
        return ex

    async def run(self, code: str, *, timeout: float | None = None) -> RunResult:
        """Run `code` and wait for its RunResult. Cancelling the caller interrupts the cell."""
        ex = self.execute(code, timeout=timeout)
        try:
            return await asyncio.shield(ex._task)
        except asyncio.CancelledError:
            await ex.interrupt()
            raise

    async def _execute(self, code: str, timeout: float | None, ex: "Execution") -> RunResult:
        t0 = time.monotonic()
        try:
            async with self._run_lock:
                self._current = asyncio.current_task()
                try:
                    res = await self._execute_locked(code, timeout, ex)
                finally:
                    self._current = None
                    self._current_msg = None
                    self._interrupted.clear()
                    self.last_used = time.monotonic()
        except asyncio.CancelledError:  # the loop is going away: release any consumer, then stop
            ex._finish(RunResult(status="interrupted", message="The run was cancelled.",
                                 duration=time.monotonic() - t0))
            raise
        except KernelStartError as e:
            res = RunResult(status="died", message=str(e))
        except Exception as e:  # never leave a consumer waiting on a run that broke
            res = RunResult(status="died", message=f"The run failed inside the client: {e!r}")
        res.duration = time.monotonic() - t0
        ex._finish(res)
        return res

    async def _execute_locked(self, code: str, timeout: float | None, ex: "Execution") -> RunResult:
        async with self._life_lock:
            await self._start_locked()
        kc, proc, tree = self._kc, self._proc, self._tree
        outs = _Outputs(self.output_cap)
        msg_id = kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        self._current_msg = ex.msg_id = msg_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        timed_out_at: float | None = None
        count: int | None = None
        died: str | None = None
        killed = False  # stopped because it ignored the interrupt after a timeout
        while True:
            now = loop.time()
            if deadline is not None and timed_out_at is None and now >= deadline:
                timed_out_at = now
                self._interrupted.discard(msg_id)
                await self._km.interrupt_kernel()
            if timed_out_at is not None and now >= timed_out_at + self.interrupt_grace:
                # The cell ignores SIGINT (e.g. stuck in C code): stop the kernel.
                await _end_tree(tree)
                killed = True
                died = (f"The cell timed out after {timeout:g} s and did not stop when "
                        f"interrupted; the kernel was stopped, its variables are lost. "
                        f"The next run starts a fresh kernel.")
                break
            wait = _POLL
            if deadline is not None and timed_out_at is None:
                wait = min(_POLL, max(0.0, deadline - now))
            try:
                msg = await kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                if proc.poll() is not None:
                    died = _death_message(proc.poll(), self._stop_reason)
                    break
                continue
            except Exception:  # sockets closed under us by shutdown
                died = _death_message(proc.poll(), self._stop_reason)
                break
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            mt, content = msg["msg_type"], msg["content"]
            if mt == "status":
                if content.get("execution_state") == "idle":
                    break
                continue
            if mt == "execute_input":
                count = content.get("execution_count", count)
                continue
            for out in outs.add(mt, content):
                ex._put(out)
        for out in outs.finish():
            ex._put(out)
        interrupted = msg_id in self._interrupted
        self._interrupted.discard(msg_id)
        res = RunResult(outputs=outs.outputs, execution_count=count, truncated=outs.cut)
        if died is not None:
            res.status = "timeout" if killed else "died"
            res.message = died
            tail = self._log_tail(800) if proc.poll() is not None and not self._stop_reason else ""
            if tail:
                res.message += f"\nKernel log:\n{tail}"
            return res
        reply = await self._reply(msg_id, deadline=None)
        if reply is not None:
            count = reply.get("execution_count", count)
            res.execution_count = count
        status = (reply or {}).get("status", "ok")
        if timed_out_at is not None:
            res.status = "timeout"
            res.message = (f"The cell timed out after {timeout:g} s and was interrupted; the "
                           f"kernel and its variables are kept.")
        elif interrupted and status != "ok":
            res.status = "interrupted"
            res.message = "Interrupted; the kernel and its variables are kept."
        elif status == "error":
            res.status = "error"
            res.message = f"{reply.get('ename', 'Error')}: {reply.get('evalue', '')}"
        elif status == "aborted":
            res.status = "error"
            res.message = "The kernel aborted this run."
        return res

    async def _reply(self, msg_id: str, deadline: float | None) -> dict[str, Any] | None:
        """The shell reply to `msg_id`, or None if the kernel died first. Raises KernelTimeout
        at `deadline` (loop time)."""
        kc, proc = self._kc, self._proc
        loop = asyncio.get_running_loop()
        while True:
            wait = _POLL if deadline is None else min(_POLL, max(0.0, deadline - loop.time()))
            try:
                msg = await kc.get_shell_msg(timeout=wait)
            except queue.Empty:
                if proc.poll() is not None:
                    return None
                if deadline is not None and loop.time() >= deadline:
                    raise KernelTimeout("no reply") from None
                continue
            except Exception:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg["content"]

    # ------------------------------------------------------------ silent calls

    async def call(self, code: str = "", expr: str | None = None, *,
                   timeout: float | None = 60.0) -> str | None:
        """Run `code` silently (no execution count, no history, outputs discarded), then return
        the text/plain of `expr` evaluated in the user's namespace (None without `expr`).
        Top-level `await` works in `code`. Raises ExecutionError when either raises,
        KernelTimeout (after interrupting) past `timeout`, KernelDied if the kernel ends."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        async with self._run_lock:
            self._current = asyncio.current_task()
            try:
                async with self._life_lock:
                    await self._start_locked()
                return await self._call_locked(code, expr, timeout)
            finally:
                self._current = None
                self._current_msg = None
                self._interrupted.clear()
                self.last_used = time.monotonic()

    async def _call_locked(self, code: str, expr: str | None, timeout: float | None) -> str | None:
        kc, proc, tree = self._kc, self._proc, self._tree
        exprs = {"r": expr} if expr is not None else {}
        msg_id = kc.execute(code, silent=True, store_history=False, user_expressions=exprs,
                            allow_stdin=False, stop_on_error=False)
        self._current_msg = msg_id
        loop = asyncio.get_running_loop()
        try:
            reply = await self._reply(msg_id, None if timeout is None else loop.time() + timeout)
        except KernelTimeout:
            await self._km.interrupt_kernel()
            try:
                await self._reply(msg_id, loop.time() + self.interrupt_grace)
            except KernelTimeout:
                await _end_tree(tree)
                raise KernelTimeout(f"no answer from the kernel within {timeout:g} s; it did not "
                                    "stop when interrupted and was stopped") from None
            raise KernelTimeout(f"no answer from the kernel within {timeout:g} s; interrupted") from None
        if reply is None:
            raise KernelDied(_death_message(proc.poll(), self._stop_reason))
        if reply.get("status") != "ok":
            raise ExecutionError(reply.get("ename", "Error"), reply.get("evalue", ""), reply.get("traceback"))
        if expr is None:
            return None
        r = reply.get("user_expressions", {}).get("r", {})
        if r.get("status") != "ok":
            raise ExecutionError(r.get("ename", "Error"), r.get("evalue", ""), r.get("traceback"))
        return r.get("data", {}).get("text/plain", "")

    async def _install(self, module: str, source: str) -> None:
        digest = hashlib.sha1(source.encode()).hexdigest()
        if self._modules.get(module) == digest:
            return
        # Called with the run lock held or from start; go straight to the locked path.
        await self._call_locked(_install_code(module, source), None, 30.0)
        self._modules[module] = digest

    async def ensure_module(self, module: str, source: str) -> None:
        """Make `source` importable in the kernel as `module` (kept out of the user's
        namespace); a no-op when this kernel already has that exact source."""
        if not re.fullmatch(r"_dialogue_\w+", module):
            raise ValueError(f"helper module names start with _dialogue_: {module!r}")
        async with self._run_lock:
            async with self._life_lock:
                await self._start_locked()
            await self._install(module, source)

    async def eval(self, expr: str, *, timeout: float = 30.0) -> str:
        """The text/plain representation of `expr` in the user's namespace, as the user would
        see it as a cell's result. For $`expr` references in prompts."""
        if not expr.strip():
            raise ValueError("empty expression")
        return await self.call("", expr, timeout=timeout) or ""

    async def shell(self, cmd: str, *, timeout: float = 60.0, limit: int = 100_000) -> str:
        """Output (stdout and stderr, interleaved) of a shell command run by the kernel, in the
        kernel's working directory and environment. For !`cmd` references in prompts."""
        if not cmd.strip():
            raise ValueError("empty shell command")
        expr = f"__import__('_dialogue_kernel').shell({cmd!r}, {timeout!r}, {limit!r})"
        # the kernel's own timeout fires first; ours is the backstop
        return await self.call("", expr, timeout=timeout + 10) or ""


class Execution:
    """A run in progress: an async iterator of outputs as they arrive, and awaitable for the
    final RunResult.

    Iterated items are nbformat outputs as the kernel sent them (stream chunks unmerged; a
    display_data with a display id carries ``"transient": {"display_id": ...}``), plus two control
    items a surface applies but never stores: ``{"output_type": "clear_output"}`` and
    ``{"output_type": "update_display_data", "display_id", "data", "metadata"}``. The awaited
    RunResult's outputs are the clean, stored form. Only one consumer may iterate."""

    _DONE = object()

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.result: RunResult | None = None
        self.msg_id: str | None = None  # set once the code is sent to the kernel
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._iterated = False

    def _put(self, out: dict[str, Any]) -> None:
        self._queue.put_nowait(out)

    def _finish(self, res: RunResult) -> None:
        self.result = res
        self._queue.put_nowait(self._DONE)

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._iterated:
            raise RuntimeError("an Execution can be iterated only once")
        self._iterated = True
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self._queue.get()
            if item is self._DONE:
                return
            yield item

    @property
    def running(self) -> bool:
        """The kernel is running this code now (not waiting for its turn, not finished)."""
        return self.msg_id is not None and self.msg_id == self.kernel._current_msg

    async def interrupt(self) -> None:
        """Interrupt this run if the kernel is running it; a run still waiting for its turn is
        dropped and never runs. Another run that holds the kernel is left alone."""
        if self.msg_id is None:
            if self._task is not None:
                self._task.cancel()
        elif self.running:
            await self.kernel.interrupt()

    def __await__(self):
        return self.wait().__await__()

    async def wait(self) -> RunResult:
        assert self._task is not None
        return await asyncio.shield(self._task)


# ---------------------------------------------------------------- run all

async def run_all(kernel: Kernel, dialogue: Dialogue, *, above: str | None = None,
                  timeout: float | None = None, stop_on_error: bool = True
                  ) -> AsyncIterator[tuple[Message, RunResult]]:
    """Run the dialogue's code messages in order ("run all"), or only those above message
    `above` ("run all above"). Yields each message updated with its outputs and execution
    count (a copy: the caller stores it) beside the RunResult. Stops after the first run that is
    not ok when `stop_on_error`, as a notebook's "run all" does, since later cells usually
    depend on earlier ones."""
    msgs: Sequence[Message] = dialogue.above(above) if above is not None else dialogue.messages
    for m in msgs:
        if m.kind != Kind.code or not m.source.strip():
            continue
        res = await kernel.run(m.source, timeout=timeout)
        yield m.copy(outputs=res.outputs, execution_count=res.execution_count), res
        if stop_on_error and not res.ok:
            return


# ---------------------------------------------------------------- pool

class KernelPool:
    """Kernels by dialogue id: started on first use, shut down after `idle_timeout` seconds
    without a run (None: never), all shut down by `shutdown_all` (and, failing that, by the
    exit hooks every Kernel registers)."""

    def __init__(self, *, idle_timeout: float | None = 3600.0, check_every: float | None = None,
                 **kernel_options: Any):
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout}")
        self.idle_timeout = idle_timeout
        self.check_every = check_every or (min(60.0, idle_timeout / 4) if idle_timeout else None)
        self.kernel_options = kernel_options
        self._kernels: dict[str, Kernel] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task | None = None

    def __contains__(self, dialogue_id: str) -> bool:
        return dialogue_id in self._kernels

    def __len__(self) -> int:
        return len(self._kernels)

    def ids(self) -> list[str]:
        return list(self._kernels)

    def peek(self, dialogue_id: str) -> Kernel | None:
        """The dialogue's kernel if it has one, without starting anything."""
        return self._kernels.get(dialogue_id)

    async def get(self, dialogue_id: str, **options: Any) -> Kernel:
        """The dialogue's kernel, started if need be. `options` (Kernel arguments, such as cwd)
        apply when the kernel is created."""
        if not dialogue_id:
            raise ValueError("a dialogue id is required")
        async with self._lock:
            k = self._kernels.get(dialogue_id)
            if k is None:
                k = Kernel(name=dialogue_id, **{**self.kernel_options, **options})
                self._kernels[dialogue_id] = k
            self._start_reaper()
        await k.start()
        return k

    def _start_reaper(self) -> None:
        if self.check_every is None or (self._reaper is not None and not self._reaper.done()):
            return
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            await self.reap_idle()

    async def reap_idle(self) -> list[str]:
        """Shut down kernels idle for longer than idle_timeout; returns their dialogue ids."""
        if self.idle_timeout is None:
            return []
        now = time.monotonic()
        idle = [i for i, k in self._kernels.items()
                if not k.busy and now - k.last_used > self.idle_timeout]
        for i in idle:
            await self.shutdown(i)
        return idle

    async def shutdown(self, dialogue_id: str) -> None:
        k = self._kernels.pop(dialogue_id, None)
        if k is not None:
            await k.shutdown()

    async def shutdown_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        ks = list(self._kernels.values())
        self._kernels.clear()
        await asyncio.gather(*(k.shutdown() for k in ks), return_exceptions=True)
