"""`serve()` as `dialogue serve` runs it: in its own process, under uvicorn."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, host: str, port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path / "home"),
           "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "PYTHONUNBUFFERED": "1"}
    code = ("from dialogue.web.app import serve; "
            f"serve(db={str(tmp_path / 'd.db')!r}, host={host!r}, port={port}, open_browser=False)")
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    first = p.stdout.readline()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return p, first
        except OSError:
            assert p.poll() is None, first + p.stdout.read()
            time.sleep(0.1)
    p.kill()
    raise AssertionError("the server did not start: " + first)


def _stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGINT)
    try:
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_loopback_needs_no_token(tmp_path):
    port = _free_port()
    p, line = _start(tmp_path, "127.0.0.1", port)
    try:
        assert line.rstrip().endswith(f" at http://127.0.0.1:{port}/") and "?token=" not in line
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        # a rebinding attack arrives with its own Host name
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "rebind.example"})
        assert r.status_code == 421
    finally:
        _stop(p)


def test_any_other_address_gets_a_token_printed_in_the_url(tmp_path):
    port = _free_port()
    p, line = _start(tmp_path, "0.0.0.0", port)
    try:
        m = re.search(rf"http://127\.0\.0\.1:{port}/\?token=([\w-]+)", line)
        assert m, line
        token = m.group(1)
        assert len(token) >= 24
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/").status_code == 401
        assert httpx.get(base + "/static/app.js").status_code == 401
        with httpx.Client(base_url=base, follow_redirects=True) as c:
            r = c.get(f"/?token={token}")
            assert r.status_code == 200 and "dialogue" in r.text and "token=" not in str(r.url)
            assert c.get("/static/app.js").status_code == 200  # the cookie carries it now
    finally:
        _stop(p)


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = ("from dialogue.web.app import serve; "
                f"serve(db={str(tmp_path / 'd.db')!r}, port={port}, open_browser=False)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DIALOGUE_HOME": str(tmp_path / "home")})
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr
