"""A live IPython kernel: its lifecycle and the messages that run code in it.

Code messages run in an ipykernel subprocess driven through `jupyter_client`'s asynchronous API,
launched by `process` (a private IPC directory, a supervisor that ends everything the kernel
starts). Outputs come back as they arrive, capped and folded by `outputs`. A kernel that dies is
noticed by polling its process, the run says so, and the next run starts a fresh kernel. Code the
app needs inside the kernel (`inside/`) is installed as private modules, out of the user's
namespace.

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

A Kernel belongs to the event loop it first ran in (its ZeroMQ sockets do).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from jupyter_client import AsyncKernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from . import inside
from .outputs import DEFAULT_OUTPUT_CAP, OutputCap, fold_output
from .process import INFO, LIVE, LIVE_LOCK, Specs, Tree, death_message, end_tree, install_hooks, private_dir

log = logging.getLogger(__name__)  # dialogue.kernel.kernel

__all__ = ["Kernel", "Execution", "RunResult", "Status", "KernelError", "KernelStartError",
           "KernelDied", "KernelTimeout", "ExecutionError"]

_HELPERS = "_dialogue_kernel"  # the module name of inside/helpers.py in the kernel
_POLL = 0.2  # seconds between liveness checks while waiting on the kernel
# After a run's execute_reply, how long the IOPub stream may stay quiet before the run ends without
# its `status: idle`. IOPub is a PUB socket: when the reader falls behind by more than the
# high-water marks, ZeroMQ drops messages, and the idle that ends a run may be one of them (the
# shell reply, on a DEALER socket, is never dropped). nbclient waits `iopub_timeout` (4 s) the same way.
IDLE_GRACE = 3.0
# ... and at most this long after the reply in all (a thread the cell started may keep printing)
IDLE_GRACE_MAX = 30.0
# Messages the client's IOPub socket queues before ZeroMQ drops (its default: 1000); the kernel's
# side is raised likewise by inside/launcher.py.
IOPUB_RCVHWM = 10_000
LOST_OUTPUT = "Some output may be missing: the kernel sent it faster than it could be read"
LOST_OUTPUT_NOTE = f"\n[{LOST_OUTPUT[0].lower()}{LOST_OUTPUT[1:]}]\n"

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


@dataclass
class _Progress:
    """What reading a run's IOPub found (see `Kernel._iopub_loop`)."""
    died: str | None = None  # the kernel ended: why, in words
    killed: bool = False  # stopped because it ignored the interrupt after a timeout
    timed_out_at: float | None = None
    count: int | None = None  # execution_count from execute_input
    lost: bool = False  # no idle within the grace after the reply: IOPub dropped messages


def _install_code(module: str, source: str, filename: str | None = None) -> str:
    """Code that (re)creates `module` in the kernel's sys.modules from `source`, compiled as
    `filename` (its real file, so tracebacks name it and show its lines). It binds one unlikely
    name in the user's namespace and deletes it again, so the user's variables are untouched."""
    digest = hashlib.sha1(source.encode()).hexdigest()
    filename = filename or f"<{module}>"
    return (
        "def __dialogue_install():\n"
        "    import sys, types\n"
        f"    m = sys.modules.get({module!r})\n"
        f"    if m is None or getattr(m, '__digest__', None) != {digest!r}:\n"
        f"        m = types.ModuleType({module!r})\n"
        f"        m.__digest__, m.__file__ = {digest!r}, {filename!r}\n"
        f"        exec(compile({source!r}, {filename!r}, 'exec'), m.__dict__)\n"
        f"        sys.modules[{module!r}] = m\n"
        "__dialogue_install()\n"
        "del __dialogue_install\n"
    )


# ---------------------------------------------------------------- the kernel

class Kernel:
    """One IPython kernel process, started on first use.

    Runs are serialized: a second `execute` waits for the first. `interrupt`, `restart` and
    `shutdown` act at once, even while a run is in progress."""

    # The jupyter_client class that talks to the kernel. A subclass may observe or filter the
    # messages it returns (the tests drop IOPub messages this way, as a slow reader loses them).
    client_class: type[AsyncKernelClient] = AsyncKernelClient

    def __init__(self, *, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
                 output_cap: int = DEFAULT_OUTPUT_CAP, python: str | None = None,
                 startup_timeout: float = 60.0, interrupt_grace: float = 5.0, name: str = "",
                 choice: Any = None, idle_grace: float = IDLE_GRACE):
        if output_cap < 0:
            raise ValueError(f"output_cap must be >= 0, got {output_cap}")
        self.cwd = str(cwd) if cwd is not None else os.getcwd()
        if not os.path.isdir(self.cwd):
            raise ValueError(f"kernel working directory {self.cwd!r} does not exist")
        self.env = dict(env or {})
        self.output_cap = output_cap
        self.python = python or sys.executable
        # which kernel (a specs.Choice): an installed kernelspec or an interpreter; None: `python`
        self.choice = choice
        self.language_info: dict[str, Any] = {}  # from the running kernel's kernel_info reply
        self.startup_timeout = startup_timeout
        self.interrupt_grace = interrupt_grace
        self.idle_grace = idle_grace  # see IDLE_GRACE
        self.name = name
        self.last_used = time.monotonic()
        self.generation = 0  # how many kernel processes this object has started
        self._km: AsyncKernelManager | None = None
        self._kc: Any = None
        self._dir: str | None = None
        self._tree: Tree | None = None
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
            if _HELPERS not in self._modules and self.is_python:  # a start cancelled midway
                await self._install_inside(_HELPERS, "helpers")
            return
        if self._km is not None:  # a dead kernel: clear it away first
            await self._stop_locked(now=True)
        await self._launch()
        self._stop_reason = None
        self._modules = {}
        self.generation += 1
        self.last_used = time.monotonic()
        if self.is_python:
            await self._install_inside(_HELPERS, "helpers")

    async def _launch(self) -> None:
        """Start the kernel process and connect to it; ready when this returns, with its
        `language_info` (`remote.RemoteKernel` starts one on a gateway instead)."""
        install_hooks()
        t0 = time.monotonic()
        d = private_dir()
        specs = Specs()
        specs.python = self.python
        specs.choice = self.choice
        specs.info = os.path.join(d, INFO)
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
            raise KernelStartError(f"could not start the kernel {self.label}: {e}") from e
        finally:
            os.close(r)
        tree = Tree(km.provisioner.process, d, w)
        with LIVE_LOCK:
            LIVE[tree.proc.pid] = tree
        self._km, self._dir, self._tree = km, d, tree
        km.client_factory = self.client_class
        kc = km.client()
        import zmq
        # before the sockets exist: a high-water mark applies to connections made after it is set
        kc.context.setsockopt(zmq.RCVHWM, IOPUB_RCVHWM)
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
                raise KernelStartError(f"could not start the kernel {self.label}: "
                                       f"{error}") from e
            raise KernelStartError(f"the kernel {self.label} did not come up ({e})"
                                   + (f"; its log ends:\n{tail}" if tail else "")) from e
        if tree.info.get("error"):  # (the kernel died before answering: wait_for_ready said so)
            await self._stop_locked(now=True)
            raise KernelStartError(f"could not start the kernel {self.label}: "
                                   f"{tree.info['error']}")
        log.info("kernel %s started (pid %s) in %.2f s", self.label, tree.proc.pid,
                 time.monotonic() - t0)
        await self._kernel_info()

    async def _kernel_info(self) -> None:
        """Ask the new kernel what it runs (language_info: exported notebooks say it)."""
        self.language_info = {}
        with contextlib.suppress(Exception):
            msg_id = self._kc.kernel_info()
            reply = await self._reply(msg_id, asyncio.get_running_loop().time() + 10)
            self.language_info = dict((reply or {}).get("language_info") or {})

    @property
    def is_python(self) -> bool:
        """The kernel runs Python (the helpers that `eval`, `shell` and tools use need it)."""
        if self.language_info:
            return str(self.language_info.get("name", "")).lower() == "python"
        return self.choice is None or self.choice.language() == "python"

    @property
    def label(self) -> str:
        """The kernel as a user names it: the kernelspec's display name, or the interpreter."""
        if self.choice is not None and not self.choice.is_default:
            return self.choice.label()
        return f"Python ({self.python})"

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
        log.info("kernel %s restarting", self.label)
        await self._stop(reason="The kernel was restarted")
        await self.start()

    async def _stop(self, reason: str) -> None:
        log.debug("kernel %s: %s", self.label, reason.lower())
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
            await end_tree(tree)
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
            with LIVE_LOCK:
                LIVE.pop(tree.proc.pid, None)
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

    def execute(self, code: str, *, timeout: float | None = None,
                allow_stdin: bool = False, cell_id: str | None = None) -> "Execution":
        """Run `code` as a cell. Iterate the result for outputs as they arrive; await it for the
        RunResult. The run proceeds whether or not anyone iterates.

        With `allow_stdin`, `input()` and `getpass()` in the cell ask: the iteration yields
        ``{"output_type": "input_request", "prompt", "password"}`` and the cell waits until
        `Execution.reply` answers (or it is interrupted). Without, they raise
        StdinNotImplementedError in the cell.

        `cell_id` goes in the request's metadata as "cellId" (the Jupyter convention; ipykernel
        passes it on to IPython): code in the cell reads it with
        `get_ipython().kernel.get_parent()["metadata"]["cellId"]` (`dialogue.here` does, to name
        the cell that made a change)."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        ex = Execution(self)
        ex.allow_stdin = allow_stdin
        ex.cell_id = cell_id
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

    def _stdin_poller(self, kc: Any) -> Any:
        """What `_iopub_loop` waits on while a cell may ask for input: `await poll(ms)` gives
        the ready ones of ``kc.iopub_channel.socket`` and ``kc.stdin_channel.socket`` (a
        ZeroMQ poller here; `remote.RemoteKernel` waits on its websocket's queues)."""
        import zmq
        import zmq.asyncio
        poller = zmq.asyncio.Poller()
        poller.register(kc.iopub_channel.socket, zmq.POLLIN)
        poller.register(kc.stdin_channel.socket, zmq.POLLIN)
        return poller

    async def _kill(self, tree: Tree | None) -> None:
        """End the kernel now, whatever it is doing (a cell that ignores the interrupt)."""
        if tree is not None:
            await end_tree(tree)

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
        outs = OutputCap(self.output_cap)
        if ex.cell_id:  # KernelClient.execute sends no metadata: the same request, with it
            msg = kc.session.msg("execute_request", {
                "code": code, "silent": False, "store_history": True, "user_expressions": {},
                "allow_stdin": ex.allow_stdin, "stop_on_error": False},
                metadata={"cellId": ex.cell_id})
            kc.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
        else:
            msg_id = kc.execute(code, store_history=True, allow_stdin=ex.allow_stdin,
                                stop_on_error=False)
        self._current_msg = ex.msg_id = msg_id
        # wait on the outputs and on the kernel's questions at once
        poller = self._stdin_poller(kc) if ex.allow_stdin else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        # The run ends with its execute_reply (shell) and its `status: idle` (IOPub), in either
        # order; IOPub may have lost the idle (see IDLE_GRACE), so the reply is awaited alongside.
        reply_task = loop.create_task(self._reply(msg_id, None))
        reply: dict[str, Any] | None = None
        try:
            st = await self._iopub_loop(kc, proc, tree, msg_id, ex, outs, poller, reply_task,
                                        deadline, timeout)
            if st.died is None:
                reply = await reply_task  # (the idle came first; the reply follows at once)
        finally:
            if not reply_task.done():
                reply_task.cancel()
        ex._pending = None  # a question the kernel no longer waits for
        for out in ex._take_echo():
            for o in outs.add("stream", out):
                ex._put(o)
        if st.lost:  # not silently: the idle never came, so other messages may be gone too
            note = {"output_type": "stream", "name": "stderr", "text": LOST_OUTPUT_NOTE}
            fold_output(outs.outputs, note)
            ex._put(note)
            log.info("kernel %s: no idle within %g s of the reply; IOPub messages were lost",
                     self.label, self.idle_grace)
        stored, last = outs.finish()
        for out in last:
            ex._put(out)
        interrupted = msg_id in self._interrupted
        self._interrupted.discard(msg_id)
        res = RunResult(outputs=stored, execution_count=st.count, truncated=outs.cut)
        if st.died is not None:
            res.status = "timeout" if st.killed else "died"
            res.message = st.died
            log.info("kernel %s: %s", self.label, st.died)  # the run reports it to the user
            tail = self._log_tail(800) if proc.poll() is not None and not self._stop_reason else ""
            if tail:
                res.message += f"\nKernel log:\n{tail}"
            return res
        if reply is not None:
            res.execution_count = reply.get("execution_count", st.count)
        status = (reply or {}).get("status", "ok")
        if st.timed_out_at is not None:
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
        if st.lost:
            res.message = "; ".join(filter(None, [res.message, LOST_OUTPUT]))
        return res

    async def _iopub_loop(self, kc: Any, proc: subprocess.Popen, tree: Tree, msg_id: str,
                          ex: "Execution", outs: OutputCap, poller: Any, reply_task: asyncio.Task,
                          deadline: float | None, timeout: float | None) -> "_Progress":
        """Read the run's IOPub messages (and the kernel's questions) until its idle, the
        kernel's death, or `idle_grace` of quiet after its reply; times the cell out at
        `deadline`."""
        loop = asyncio.get_running_loop()
        st = _Progress()
        replied_at: float | None = None  # when the reply came
        heard_at = 0.0  # when the run's IOPub last spoke
        while True:
            now = loop.time()
            if replied_at is None and reply_task.done():
                if reply_task.result() is None:  # the kernel died first
                    st.died = death_message(proc.poll(), self._stop_reason)
                    break
                replied_at = heard_at = now
            if replied_at is not None and (now >= heard_at + self.idle_grace
                                           or now >= replied_at + max(IDLE_GRACE_MAX, self.idle_grace)):
                st.lost = True
                break
            if replied_at is None and deadline is not None and st.timed_out_at is None and now >= deadline:
                st.timed_out_at = now
                self._interrupted.discard(msg_id)
                await self._km.interrupt_kernel()
            if (replied_at is None and st.timed_out_at is not None
                    and now >= st.timed_out_at + self.interrupt_grace):
                # The cell ignores SIGINT (e.g. stuck in C code): stop the kernel.
                await self._kill(tree)
                st.killed = True
                st.died = (f"The cell timed out after {timeout:g} s and did not stop when "
                           f"interrupted; the kernel was stopped, its variables are lost. "
                           f"The next run starts a fresh kernel.")
                break
            wait = _POLL
            if replied_at is not None:
                wait = min(_POLL, max(0.0, heard_at + self.idle_grace - now))
            elif deadline is not None and st.timed_out_at is None:
                wait = min(_POLL, max(0.0, deadline - now))
            try:
                if poller is not None:
                    ready = dict(await poller.poll(int(wait * 1000)))
                    for out in ex._take_echo():  # an answer given: before what follows it
                        for o in outs.add("stream", out):
                            ex._put(o)
                    if kc.stdin_channel.socket in ready:
                        await self._stdin_request(kc, msg_id, ex)
                        continue
                    if kc.iopub_channel.socket not in ready:
                        raise queue.Empty
                    wait = 0
                msg = await kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                if proc.poll() is not None:
                    st.died = death_message(proc.poll(), self._stop_reason)
                    break
                continue
            except Exception:  # sockets closed under us by shutdown
                st.died = death_message(proc.poll(), self._stop_reason)
                break
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            heard_at = loop.time()
            mt, content = msg["msg_type"], msg["content"]
            if mt == "status":
                if content.get("execution_state") == "idle":
                    break
                continue
            if mt == "execute_input":
                st.count = content.get("execution_count", st.count)
                continue
            for out in outs.add(mt, content):
                ex._put(out)
        return st

    async def _stdin_request(self, kc: Any, msg_id: str, ex: "Execution") -> None:
        """The kernel asks for a line (input(), getpass()): pass the question to the run's
        listener, who answers with `Execution.reply`."""
        try:
            msg = await kc.get_stdin_msg(timeout=0)
        except queue.Empty:
            return
        if msg["msg_type"] != "input_request" or msg["parent_header"].get("msg_id") != msg_id:
            return
        c = msg["content"]
        ex._pending = {"output_type": "input_request", "prompt": str(c.get("prompt", "")),
                       "password": bool(c.get("password"))}
        ex._put(dict(ex._pending))

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
                await self._kill(tree)
                raise KernelTimeout(f"no answer from the kernel within {timeout:g} s; it did not "
                                    "stop when interrupted and was stopped") from None
            raise KernelTimeout(f"no answer from the kernel within {timeout:g} s; interrupted") from None
        if reply is None:
            raise KernelDied(death_message(proc.poll(), self._stop_reason))
        if reply.get("status") != "ok":
            raise ExecutionError(reply.get("ename", "Error"), reply.get("evalue", ""), reply.get("traceback"))
        if expr is None:
            return None
        r = reply.get("user_expressions", {}).get("r", {})
        if r.get("status") != "ok":
            raise ExecutionError(r.get("ename", "Error"), r.get("evalue", ""), r.get("traceback"))
        return r.get("data", {}).get("text/plain", "")

    async def _install(self, module: str, source: str, filename: str | None = None) -> None:
        digest = hashlib.sha1(source.encode()).hexdigest()
        if self._modules.get(module) == digest:
            return
        # Called with the run lock held or from start; go straight to the locked path.
        await self._call_locked(_install_code(module, source, filename), None, 30.0)
        self._modules[module] = digest

    async def _install_inside(self, module: str, name: str) -> None:
        await self._install(module, inside.source(name), inside.path(name))

    async def ensure_module(self, module: str, source: str, *, filename: str | None = None) -> None:
        """Make `source` importable in the kernel as `module` (kept out of the user's
        namespace); a no-op when this kernel already has that exact source. `filename`: the
        file the source was read from (see `inside`), named in tracebacks."""
        if not re.fullmatch(r"_dialogue_\w+", module):
            raise ValueError(f"helper module names start with _dialogue_: {module!r}")
        async with self._run_lock:
            async with self._life_lock:
                await self._start_locked()
            await self._install(module, source, filename)

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
        expr = f"__import__({_HELPERS!r}).shell({cmd!r}, {timeout!r}, {limit!r})"
        # the kernel's own timeout fires first; ours is the backstop
        return await self.call("", expr, timeout=timeout + 10) or ""


class Execution:
    """A run in progress: an async iterator of outputs as they arrive, and awaitable for the
    final RunResult.

    Iterated items are nbformat outputs as the kernel sent them (stream chunks unmerged; a
    display_data with a display id carries ``"transient": {"display_id": ...}``), plus two control
    items a follower applies but never stores: ``{"output_type": "clear_output"}`` (never with
    ``wait``: a waiting clear is passed on just before the output that sets it off) and
    ``{"output_type": "update_display_data", "display_id", "data", "metadata"}``. Folding them in
    order with `outputs.fold_output` gives what the cell shows; the awaited RunResult's outputs
    are the clean, stored form of the same. Only one consumer may iterate."""

    _DONE = object()

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.result: RunResult | None = None
        self.msg_id: str | None = None  # set once the code is sent to the kernel
        self.allow_stdin = False
        self.cell_id: str | None = None  # the message this run is (the request's "cellId")
        self._pending: dict[str, Any] | None = None  # the kernel's unanswered question
        self._echo: list[dict[str, Any]] = []  # answers to show in the output, in order
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._iterated = False

    def _put(self, out: dict[str, Any]) -> None:
        self._queue.put_nowait(out)

    @property
    def waiting_for_input(self) -> dict[str, Any] | None:
        """The question the cell waits on ({"prompt", "password"}), or None."""
        return dict(self._pending) if self._pending else None

    def reply(self, text: str) -> None:
        """Answer the cell's input() (one line; a password is not echoed in the output)."""
        q = self._pending
        if q is None or not self.running:
            raise KernelError("this cell is not waiting for input")
        if not isinstance(text, str):
            raise TypeError(f"an answer is a str, not {type(text).__name__}")
        text = text.split("\n", 1)[0].rstrip("\r")  # one line, as a terminal gives it
        self._pending = None
        self.kernel._kc.input(text)
        # what a terminal shows: the prompt and the typed line (a password: nothing)
        shown = q["prompt"] + ("" if q["password"] else text) + "\n"
        self._echo.append({"name": "stdout", "text": shown})

    def _take_echo(self) -> list[dict[str, Any]]:
        out, self._echo = self._echo, []
        return out

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
