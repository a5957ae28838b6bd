"""The local model's own process: `python -m dialogue.local.worker FD_IN FD_OUT`.

llama.cpp is native code built for whatever CPU compiled it, and some paths crash (a general
protection fault in AMX kernels, an abort on a malformed file, the OOM killer). Here a crash ends
this process only; `dialogue.local.process.ModelProcess` in the app sees the pipe close, fails the
answer in progress with a clear error and starts a fresh process for the next prompt, the way
Jupyter runs kernels.

The protocol is pickled tuples over two pipes inherited from the parent (never stdout, which
llama.cpp may write to), through `multiprocessing.connection.Connection`: it frames messages and
pickles, so there is no framing code of ours. Pickle is safe here because both ends are this
package, started by the app itself.

    request:  (id, op, kwargs)
    replies:  (id, "ok", value) | (id, "error", exception) | (id, "text", str)
              | (id, "progress", (read, total, eta_s))      then (id, "ok", GenStats) ends a generation

Generations and anything that touches the model's context (adapters, reset) run one at a time on
a worker thread; the main thread keeps reading, so a "cancel" reaches a running generation within
a token and tokenizing a prompt does not wait for an answer to finish. The process ends when the
app does, however the app ended (SIGKILL included): the main thread always waits on the request
pipe, the app held its only write end, so the kernel's closing of the app's files is an EOF here.
(PR_SET_PDEATHSIG is not used: it fires when the *thread* that started the process exits, and the
app starts model processes from short-lived worker threads.)
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

TEST_HOOKS_ENV = "DIALOGUE_TEST_HOOKS"


def _crash(how: str) -> None:
    """Test-only: die the way native code dies. Only reachable when the app started this process
    with DIALOGUE_TEST_HOOKS=1 in its environment."""
    if how == "segv":
        ctypes.string_at(0)          # a real SIGSEGV inside native code (libc's memcpy)
    elif how == "abort":
        os.abort()                   # SIGABRT, as a failed GGML_ASSERT does
    elif how == "exit":
        os._exit(3)
    raise ValueError(f"unknown crash {how!r}")


def _planned_crash() -> tuple[int, str] | None:
    """Test-only: a crash planned by the file named in DIALOGUE_TEST_CRASH_FILE ("N how": die the
    way `how` says after N pieces of the next answer). The file is consumed, so only one answer
    crashes and the test can see the next one answered."""
    path = os.environ.get("DIALOGUE_TEST_CRASH_FILE")
    if not path:
        return None
    try:
        with open(path) as f:
            words = f.read().split()
        os.unlink(path)
    except OSError:
        return None
    return int(words[0]), (words[1] if len(words) > 1 else "segv")


class Worker:
    def __init__(self, conn_in: Connection, conn_out: Connection):
        self.cin, self.cout = conn_in, conn_out
        self._send_lock = threading.Lock()
        self.rt: Any = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gen")
        self.cancels: dict[int, threading.Event] = {}
        self.caches: dict[str, Any] = {}
        self.hooks = os.environ.get(TEST_HOOKS_ENV) == "1"

    def send(self, msg: tuple) -> None:
        with self._send_lock:
            try:
                self.cout.send(msg)
            except (BrokenPipeError, OSError):
                os._exit(0)  # the app is gone: nobody to answer

    def reply(self, rid: int, fn: Any) -> None:
        try:
            self.send((rid, "ok", fn()))
        except BaseException as e:  # noqa: BLE001 - every error goes back to the caller
            try:
                self.send((rid, "error", e))
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                self.send((rid, "error", RuntimeError(f"{type(e).__name__}: {e}")))

    # ------------------------------------------------------------ ops

    def op_load(self, rid: int, spec: Any, n_ctx: int, n_threads: int | None, n_gpu_layers: int | None,
                extra_bufts: bool | None, cache_dir: str | None) -> dict:
        from .kvcache import KVCache
        from .runtime import Runtime
        cache = KVCache(cache_dir) if cache_dir else None
        sent = [-1]

        def on_load(fraction: float) -> None:  # llama.cpp calls it per tensor: send whole percents
            pct = int(fraction * 100)
            if pct > sent[0]:
                sent[0] = pct
                self.send((rid, "progress", pct))

        self.rt = Runtime(spec, n_ctx=n_ctx, cache=cache, n_threads=n_threads,
                          n_gpu_layers=n_gpu_layers, extra_bufts=extra_bufts, on_load=on_load)
        return self.info()

    def info(self) -> dict:
        rt = self.rt
        return {"pid": os.getpid(), "n_ctx": rt.n_ctx, "model_hash": rt.model_hash,
                "adapters": rt.adapters, "cache_namespace": rt.cache_namespace,
                "gpu_layers": rt.gpu_layers, "extra_bufts": bool(rt.llm.model_params.use_extra_bufts),
                "n_vocab": rt.llm.n_vocab(), "cache_dir": str(rt.cache.root),
                "loaded_adapters": sorted(rt._lora)}

    def op_generate(self, rid: int, prompt: Any, kw: dict) -> Any:
        cancel = self.cancels[rid]
        cache_dir = kw.pop("cache_dir", None)
        if cache_dir:  # the app's cache directory as it is now (its settings live in the app)
            from .kvcache import KVCache
            if str(self.rt.cache.root) != cache_dir:
                self.rt.cache = self.caches.setdefault(cache_dir, KVCache(cache_dir))
        on_text = lambda t: self.send((rid, "text", t))  # noqa: E731
        if self.hooks and (planned := _planned_crash()):
            after, how = planned
            pieces = [0]

            def on_text(t: str) -> None:  # noqa: F811 - the test hook's variant
                self.send((rid, "text", t))
                pieces[0] += 1
                if pieces[0] >= after:
                    _crash(how)
        try:
            return self.rt.generate(
                prompt, cancel=cancel, on_text=on_text,
                on_progress=lambda r, n, eta: self.send((rid, "progress", (r, n, eta))), **kw)
        finally:
            self.cancels.pop(rid, None)

    def op_evaluated(self) -> int:
        from .kvcache import evaluated_tokens
        return len(evaluated_tokens(self.rt.llm))

    # ------------------------------------------------------------ loop

    def serve(self) -> None:
        while True:
            try:
                rid, op, kw = self.cin.recv()
            except (EOFError, OSError):
                os._exit(0)  # the app closed the pipe or died
            if op == "cancel":
                ev = self.cancels.get(kw["id"])
                if ev is not None:
                    ev.set()
                continue
            if op == "close":
                self.send((rid, "ok", None))
                os._exit(0)
            if op == "crash":
                if self.hooks:
                    _crash(kw["how"])
                self.send((rid, "error", PermissionError("test hooks are off in this model process")))
                continue
            if op == "load":
                self.reply(rid, lambda: self.op_load(rid, **kw))
            elif op in ("tokenize", "count_tokens", "detokenize", "build_prompt", "render"):
                # the vocabulary and templates only: alongside a running generation
                self.reply(rid, lambda: getattr(self.rt, op)(*kw.get("args", ()), **kw.get("kw", {})))
            elif op == "generate":
                self.cancels[rid] = threading.Event()
                self.pool.submit(self.reply, rid, lambda rid=rid, kw=kw: self.op_generate(rid, **kw))
            elif op in ("set_adapters", "reset", "info", "evaluated"):
                fn = {"set_adapters": lambda kw=kw: self.rt.set_adapters(kw["adapters"]),
                      "reset": lambda: self.rt.reset(), "info": self.info,
                      "evaluated": self.op_evaluated}[op]
                self.pool.submit(self.reply, rid, fn)
            else:
                self.send((rid, "error", ValueError(f"unknown op {op!r}")))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fd_in, fd_out = int(argv[0]), int(argv[1])
    # a Ctrl+C in the terminal reaches the whole process group: the app decides what stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Worker(Connection(fd_in, writable=False), Connection(fd_out, readable=False)).serve()


if __name__ == "__main__":
    main()
