"""Helpers shared by the browser tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dialogue.service import DialogueService


def stored(server, did: str):
    """The dialogue as the test server's database holds it (read through a service of our own)."""
    svc = DialogueService(server.db)
    try:
        return svc.open(did)
    finally:
        svc.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TESTS = Path(__file__).parent.parent


def start_server(tmp: Path, db: Path, port: int, prelude: str = "", log: Path | None = None) -> subprocess.Popen:
    """`dialogue serve` as a user starts it, on `port` and `db` (after running `prelude`, with
    tests/ importable); returns once it accepts connections."""
    env = {**os.environ, "DIALOGUE_HOME": str(tmp / "home"),
           "DIALOGUE_CACHE_DIR": str(tmp / "kv"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    env.pop("DIALOGUE_MODEL", None)
    code = (f"{prelude}\nfrom dialogue.web.app import serve; "
            f"serve(db={str(db)!r}, port={port}, open_browser=False)")
    log = log or tmp / f"server-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def claude_server(tmp: Path, db_name: str = "claude.db") -> Iterator[tuple[object, str, Path]]:
    """A dialogue server whose Claude is a local replay server (ANTHROPIC_BASE_URL in its
    process): yields (the ReplayServer, the server's URL, its database)."""
    from servers import ReplayServer
    with ReplayServer() as srv:
        port, db = free_port(), tmp / db_name
        prelude = (f"import os; os.environ['ANTHROPIC_BASE_URL'] = {srv.base_url!r}; "
                   "os.environ['ANTHROPIC_API_KEY'] = 'sk-ant-test'")
        proc = start_server(tmp, db, port, prelude=prelude)
        try:
            yield srv, f"http://127.0.0.1:{port}", db
        finally:
            stop(proc)
