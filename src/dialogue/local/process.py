"""The local model in a supervised process of its own (`dialogue.local.worker`), seen from the app.

A native crash in llama.cpp (a segfault on a CPU whose kernels misbehave, an abort, the OOM
killer) must end one answer, never the server, its kernels or the store. So the app never loads a
model itself: a `ModelProcess` starts `python -m dialogue.local.worker`, loads the model there and
talks to it over two pipes. When the process dies, every call in flight fails with
`ModelCrashedError` ("the local model process crashed (signal 11) ...; it restarts on the next
prompt") and the next call starts a fresh process. What survives a crash: the disk KV cache (files,
written atomically), the dialogue's adapter set (sent with every generation), everything in the
store. What is lost: the prefix still in the dead process's memory (the disk cache usually holds
most of it).

Costs, measured by `bench/ttft_bench.py --process`: one message per streamed piece of text over a
pipe, a few tens of microseconds against a token time of 10+ ms. Prompts travel as token lists,
built in the model process (the tokenizer and chat template live with the model).

One `ModelProcess` per (model file, context size) per app, shared by every dialogue, like the
in-process runtimes before it (`get_model_process`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

from ..errors import ProviderError
from ..gguf.models import ModelSpec
from .runtime import DEFAULT_N_CTX, GenStats, Prompt, shared
from ..progress import OnProgress, Steps

__all__ = ["ModelProcess", "ModelCrashedError", "get_model_process"]

log = logging.getLogger(__name__)


class ModelCrashedError(ProviderError):
    """The model process died (signal or exit) while working on a request."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "signal"
        return f"crashed ({name}, signal {-code})"
    return f"exited with status {code}"


_START_LOCK = threading.Lock()


class ModelProcess:
    """A model loaded in its own process, with the calls of `runtime.Runtime` that the app uses.

    Thread-safe: calls may come from the event loop and from worker threads. Synchronous calls
    (`tokenize`, `build_prompt`, `set_adapters`...) block until the process answers; `stream`
    is async and cancels the generation when its iterator is closed."""

    def __init__(self, spec: ModelSpec, *, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 n_gpu_layers: int | None = None, extra_bufts: bool | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None):
        self.spec = spec
        self.n_ctx = n_ctx
        self._load = dict(spec=spec, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                          extra_bufts=extra_bufts, cache_dir=str(cache_dir) if cache_dir else None)
        self._env = dict(env) if env is not None else None
        self._lock = threading.RLock()   # starting and ending processes
        self._ids = itertools.count(1)
        self._link: _Link | None = None   # the current process and its pipes
        self._info: dict[str, Any] = {}
        self._stderr: Any = None
        self.starts = 0        # processes started (tests: a crash makes the next call start one)
        self.crashes = 0
        self.last_exit: str = ""

    # ------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        link = self._link
        return link.proc.pid if link is not None and link.proc.poll() is None else None

    @property
    def alive(self) -> bool:
        link = self._link
        return link is not None and not link.ended and link.proc.poll() is None

    def start(self, on_progress: OnProgress | None = None) -> dict[str, Any]:
        """Start the process and load the model, if not running. Returns its `info`.
        `on_progress` hears the load as `Step`s in percent (from llama.cpp's load callback)."""
        with self._lock:
            if self.alive:
                return self._info
            self._end_link()
            r_req, w_req = os.pipe()   # app -> worker
            r_rep, w_rep = os.pipe()   # worker -> app
            self._stderr = tempfile.TemporaryFile(prefix="dialogue-model-")
            env = dict(os.environ if self._env is None else self._env)
            try:
                with _START_LOCK:  # pass_fds + fork: keep other starts from inheriting our pipes
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "dialogue.local.worker", str(r_req), str(w_rep)],
                        pass_fds=(r_req, w_rep), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=self._stderr, env=env, close_fds=True)
            except BaseException:
                for fd in (r_rep, w_req):
                    os.close(fd)
                raise
            finally:
                os.close(r_req)
                os.close(w_rep)
            link = self._link = _Link(proc, Connection(r_rep, writable=False),
                                      Connection(w_req, readable=False))
            self.starts += 1
            link.reader = threading.Thread(target=self._read, args=(link,),
                                           name=f"model-{self.spec.name}", daemon=True)
            link.reader.start()
        steps = Steps(on_progress, f"loading the model {self.spec.name}", total=100, unit="%")
        t0 = time.monotonic()
        try:
            self._info = self._call("load", on_event=lambda pct: steps.update(pct), **self._load)
            log.info("model %s loaded in %.2f s (process %s, %s)", self.spec.name,
                     time.monotonic() - t0, self.pid, self.spec.path)
            steps.finish()
        except ModelCrashedError:
            raise
        except ProviderError:
            self.close()
            raise
        return self._info

    def _end_link(self) -> None:
        """End the current process (if any) and wait until its reader thread let go of its pipe:
        a pipe's file descriptor must not be closed while a thread may still read it, or a new
        pipe given the same number could be read by the old thread."""
        link, self._link = self._link, None
        if link is None:
            return
        link.close_write()  # the worker reads EOF and exits
        try:
            link.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            link.proc.kill()
            link.proc.wait()
        if link.reader is not None and link.reader is not threading.current_thread():
            link.reader.join(timeout=30)

    def close(self) -> None:
        """Stop the process (asking first, then SIGKILL)."""
        with self._lock:
            link = self._link
            if link is not None and link.proc.poll() is None:
                try:
                    link.send((0, "close", {}))
                except (OSError, ValueError):
                    pass
            self._end_link()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the process (tests; the OOM killer's view of things)."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, sig)

    def stderr_tail(self, n: int = 2000) -> str:
        """The end of what the process wrote on stderr (llama.cpp's messages), for diagnostics."""
        f = self._stderr
        if f is None:
            return ""
        try:
            f.flush()
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    # ------------------------------------------------------------ messaging

    def _read(self, link: "_Link") -> None:
        """The reader of one process's replies: dispatches them, and when the process is gone
        fails whatever still waits on *that* process (never on a newer one)."""
        while True:
            try:
                rid, kind, val = link.rd.recv()
            except (EOFError, OSError, ValueError):
                break
            except Exception as e:  # noqa: BLE001 - a reply that does not unpickle
                log.warning("unreadable reply from the model process: %s", e)
                continue
            cb = link.pending.get(rid)
            if cb is not None:
                cb(kind, val)
        link.close_read()
        link.close_write()
        try:
            code = link.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a closed pipe but a live process: end it
            link.proc.kill()
            code = link.proc.wait()
        exit_text = _describe_exit(code)
        if self._link is link or self._link is None:
            self.last_exit = exit_text
        waiting = link.end()
        if waiting and code != 0:
            self.crashes += 1
            log.info("the model process of %s %s", self.spec.name, exit_text)
        if waiting:
            tail = self.stderr_tail(600).strip().splitlines()
            hint = f" (its last words: {tail[-1][:200]})" if tail else ""
            err = ModelCrashedError(
                f"the local model process {exit_text} while working on this answer{hint}; "
                f"it restarts on the next prompt")
            for cb in waiting:
                cb("crashed", err)

    def _send(self, rid: int, op: str, kw: dict[str, Any], cb: Callable[[str, Any], None]) -> "_Link":
        link = self._link
        if link is None or not link.add(rid, cb):
            raise ModelCrashedError(f"the local model process {self.last_exit or 'is not running'}; "
                                    "it restarts on the next prompt")
        try:
            link.send((rid, op, kw))
        except (OSError, ValueError) as e:
            link.pending.pop(rid, None)
            raise ModelCrashedError(f"the local model process is gone ({e}); it restarts on the "
                                    "next prompt") from e
        return link

    def _call(self, op: str, on_event: Callable[[Any], None] | None = None, **kw: Any) -> Any:
        """One request, one answer, blocking; `on_event` hears its "progress" replies (in the
        reader thread)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        rid = next(self._ids)

        def cb(kind: str, val: Any) -> None:
            if kind == "ok":
                fut.set_result(val)
            elif kind in ("error", "crashed"):
                fut.set_exception(val)
            elif kind == "progress" and on_event is not None:
                try:
                    on_event(val)
                except Exception:  # noqa: BLE001 - a display's failure must not kill the reader
                    log.exception("a progress callback failed")

        link = self._send(rid, op, kw, cb)
        try:
            return fut.result()
        finally:
            link.pending.pop(rid, None)

    def call(self, op: str, **kw: Any) -> Any:
        """A request to the model process, starting it first if needed."""
        if not self.alive:
            self.start()
        return self._call(op, **kw)

    # ------------------------------------------------------------ the runtime's calls

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        return self.call("tokenize", args=(text,), kw={"special": special, "add_bos": add_bos})

    def count_tokens(self, text: str) -> int:
        return self.call("count_tokens", args=(text,))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.call("detokenize", args=(list(tokens),))

    def render(self, messages: Sequence[Mapping[str, str]], **kw: Any) -> str:
        return self.call("render", args=([dict(m) for m in messages],), kw=kw)

    def build_prompt(self, messages: Sequence[Mapping[str, str]], prefill: str = "", **kw: Any) -> Prompt:
        return self.call("build_prompt", args=([dict(m) for m in messages], prefill), kw=kw)

    def set_adapters(self, adapters: Mapping[str | os.PathLike[str], float] | None) -> None:
        self.call("set_adapters", adapters={str(k): float(v) for k, v in (adapters or {}).items()})

    def status(self) -> dict[str, Any]:
        """The process's state now (adapters applied and loaded, cache namespace), after any
        generation in progress."""
        return self.call("info")

    @property
    def adapters(self) -> dict[str, float]:
        return self.status()["adapters"]

    @property
    def cache_namespace(self) -> str:
        return self.status()["cache_namespace"]

    def _gen_kw(self, kw: dict[str, Any]) -> dict[str, Any]:
        kw.pop("cancel", None)
        if self._load["cache_dir"] is None and kw.get("use_cache", True):
            # the KV cache directory is the app's setting ($DIALOGUE_CACHE_DIR, $DIALOGUE_HOME), read
            # at each call as the in-process runtime did, not frozen when the process started
            from .kvcache import default_cache_dir
            kw["cache_dir"] = str(default_cache_dir())
        return kw

    def reset(self) -> None:
        self.call("reset")

    def evaluated(self) -> int:
        """How many tokens the model's context holds (tests: a cancelled answer stopped early)."""
        return self.call("evaluated")

    def crash(self, how: str = "segv") -> None:
        """Test-only: make the process die natively (needs DIALOGUE_TEST_HOOKS=1 in its env)."""
        rid = next(self._ids)
        self._send(rid, "crash", {"how": how}, lambda kind, val: None)

    def generate(self, prompt: Prompt, **kw: Any) -> GenStats:
        """Blocking generation (benches, tools); `on_text` / `on_progress` are called in the
        reader thread."""
        on_text = kw.pop("on_text", None)
        on_progress = kw.pop("on_progress", None)
        kw = self._gen_kw(kw)
        if not self.alive:
            self.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        rid = next(self._ids)

        def cb(kind: str, val: Any) -> None:
            if kind == "text":
                if on_text:
                    on_text(val)
            elif kind == "progress":
                if on_progress:
                    on_progress(*val)
            elif kind == "ok":
                fut.set_result(val)
            else:
                fut.set_exception(val)

        link = self._send(rid, "generate", {"prompt": prompt, "kw": kw}, cb)
        try:
            return fut.result()
        finally:
            link.pending.pop(rid, None)

    async def stream(self, prompt: Prompt, **kw: Any) -> AsyncIterator[str | GenStats | tuple]:
        """Generate in the model process; yield text pieces, ("progress", read, total, eta_s)
        tuples while the prompt is read, then the `GenStats`. Closing the iterator cancels the
        generation and waits until the process let go of the model (or died). Errors
        (ContextTooLongError, AdapterError, ModelCrashedError) are raised here."""
        kw = self._gen_kw(kw)
        if not self.alive:
            await asyncio.to_thread(self.start)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        rid = next(self._ids)
        finished = False

        def cb(kind: str, val: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, (kind, val))

        link = self._send(rid, "generate", {"prompt": prompt, "kw": kw}, cb)
        try:
            while True:
                kind, val = await q.get()
                if kind == "text":
                    yield val
                elif kind == "progress":
                    yield ("progress", *val)
                elif kind == "ok":
                    finished = True
                    yield val
                    return
                else:
                    finished = True
                    raise val
        finally:
            if not finished:
                try:
                    link.send((0, "cancel", {"id": rid}))
                    sent = True
                except (OSError, ValueError):  # the process is gone: its reader ends the call
                    sent = not link.ended
                if sent:
                    # wait for the generation to end (or the process to die) so the next call
                    # starts on a consistent context
                    async def drain() -> None:
                        while True:
                            kind, _ = await q.get()
                            if kind not in ("text", "progress"):
                                return
                    try:
                        await asyncio.shield(asyncio.wait_for(drain(), timeout=60))
                    except (asyncio.TimeoutError, asyncio.CancelledError):
                        pass
            link.pending.pop(rid, None)


class _Link:
    """One model process and its two one-way pipes (a plain fd per direction, so the worker is
    given exactly the two it needs), with the calls waiting on it. Each process has its own: a
    late event of a dead process can never fail or answer a call made to its successor. The
    read end is closed only by the reader thread, after its last read."""

    def __init__(self, proc: subprocess.Popen, rd: Connection, wr: Connection):
        self.proc, self.rd, self.wr = proc, rd, wr
        self.reader: threading.Thread | None = None
        self.pending: dict[int, Callable[[str, Any], None]] = {}
        self.ended = False
        self._lock = threading.Lock()

    def add(self, rid: int, cb: Callable[[str, Any], None]) -> bool:
        with self._lock:
            if self.ended:
                return False
            self.pending[rid] = cb
            return True

    def end(self) -> list[Callable[[str, Any], None]]:
        """Mark the process gone; the callbacks still waiting on it."""
        with self._lock:
            self.ended = True
            waiting, self.pending = list(self.pending.values()), {}
            return waiting

    def send(self, obj: Any) -> None:
        with self._lock:
            if self.wr.closed:
                raise OSError("the pipe to the model process is closed")
            self.wr.send(obj)

    def close_write(self) -> None:
        with self._lock:
            if not self.wr.closed:
                with contextlib.suppress(OSError):
                    self.wr.close()

    def close_read(self) -> None:
        with contextlib.suppress(OSError):
            self.rd.close()


# ---------------------------------------------------------------- shared processes

_procs: dict[tuple[str, int], ModelProcess] = {}
_procs_lock = threading.Lock()


def get_model_process(model: str | ModelSpec = "default", *, n_ctx: int = DEFAULT_N_CTX) -> ModelProcess:
    """The app-wide model process for a model file and context size (not started until used)."""
    return shared(_procs, _procs_lock, model, n_ctx, lambda s, n: ModelProcess(s, n_ctx=n))
