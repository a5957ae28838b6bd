"""Running the server behind a proxy or a supervisor: keep-alive pings on quiet event streams,
/healthz, and the JSON access log."""
from __future__ import annotations

import json
import logging
import time

import pytest
from starlette.testclient import TestClient

from dialogue.service import DialogueService
from dialogue.web import create_app
from dialogue.web.app import ACCESS_LOGGER

from webutil import BASE, HX, line_events, live_server


def test_a_quiet_cell_s_stream_gets_keep_alive_pings_and_still_ends_with_done(db_path, db):
    """A cell that prints nothing for two seconds: the client hears `: ping` comments meanwhile
    (a proxy that closes idle connections keeps it open), then the usual events, unchanged."""
    d = db.create("Quiet")
    m = db.add(d.id, "code", "import time\nprint('before', flush=True)\ntime.sleep(2)\nprint('after')")
    with live_server(db_path, sse_ping=0.25) as live:
        assert live.post(f"/d/{d.id}/m/{m.id}/run").status_code == 200
        lines, t0 = [], time.monotonic()
        with live.stream("GET", f"/d/{d.id}/m/{m.id}/stream") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            for line in r.iter_lines():
                lines.append((time.monotonic() - t0, line))
                if line.startswith("event: close"):
                    break
        pings = [t for t, ln in lines if ln.startswith(": ping")]
        assert len(pings) >= 4, lines  # 2 s of silence at one ping every 0.25 s
        done_at = next(t for t, ln in lines if ln == "event: done")
        assert all(t < done_at for t in pings[:4])
        # the comments are invisible to EventSource: the events decode as before
        events = list(line_events(ln for _, ln in lines + [(0, "")]))
        names = [e for e, _ in events]
        assert names[0] == "snapshot" and names[-2:] == ["done", "close"]
        assert "after" in dict(events)["done"]


def test_streams_ping_every_15_s_by_default(app):
    assert app.state.site.sse_ping == 15.0


# ---------------------------------------------------------------- /healthz

def test_healthz_answers_json_and_writes_nothing(client, db_path):
    before = db_path.stat().st_mtime_ns if db_path.exists() else None
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["cache-control"] == "no-store"
    assert (db_path.stat().st_mtime_ns if db_path.exists() else None) == before
    assert client.head("/healthz").status_code == 200  # a HEAD probe works too
    assert client.post("/healthz", headers=HX).status_code == 405


def test_healthz_needs_no_token_but_everything_else_still_does(db_path):
    app = create_app(DialogueService(db_path), token="s3cret", allowed_hosts=None, port=5001)
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/health").status_code == 401  # the page's own poll: behind the token
        assert c.get("/").status_code == 401
        assert c.get("/healthz/x").status_code == 401


def test_healthz_is_host_checked_like_every_route(client):
    """Without a token the server answers only loopback Host names (DNS rebinding): so does
    /healthz, and a malformed Host is refused."""
    assert client.get("/healthz", headers={"Host": "evil.example"}).status_code == 421
    assert client.get("/healthz", headers={"Host": "127.0.0.1:5001@evil"}).status_code == 400
    assert client.get("/healthz", headers={"Host": "localhost:5001"}).status_code == 200


# ---------------------------------------------------------------- access log

class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines():
    log = logging.getLogger(ACCESS_LOGGER)
    h = _Lines()
    log.addHandler(h)
    old = log.level
    log.setLevel(logging.INFO)
    yield h.lines
    log.removeHandler(h)
    log.setLevel(old)


def test_the_access_log_is_one_json_line_per_request_and_hides_the_token(db_path, access_lines):
    app = create_app(DialogueService(db_path), token="s3cret", allowed_hosts=None, port=5001,
                     access_log=True)
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        c.get("/healthz", headers={"User-Agent": "probe/1"})
        c.get("/?token=s3cret&x=1")
        c.get("/", headers={"Authorization": "token wrong"})
        c.get("/", headers={"Authorization": "token s3cret"})
    recs = [json.loads(x) for x in access_lines]
    assert [(r["method"], r["path"], r["status"]) for r in recs] == [
        ("GET", "/healthz", 200), ("GET", "/", 303), ("GET", "/", 401), ("GET", "/", 200)]
    assert recs[0]["user_agent"] == "probe/1" and recs[0]["bytes"] == len(b'{"status":"ok"}')
    assert recs[1]["query"] == "token=%2A%2A%2A&x=1"
    assert all("s3cret" not in line for line in access_lines)
    assert recs[3]["bytes"] > 1000 and recs[3]["ms"] >= 0 and recs[3]["client"]
    assert recs[0]["time"].endswith("+00:00")


def test_the_access_log_is_off_by_default(client, access_lines):
    client.get("/healthz")
    client.get("/")
    assert access_lines == []


# ---------------------------------------------------------------- dialogue serve, end to end

def test_dialogue_serve_takes_the_access_log_from_the_config_file_and_refuses_a_bad_ping(tmp_path):
    """`dialogue serve` as a supervisor runs it: /healthz answers, the access log is on from the
    config file and goes to stderr, and a bad sse_ping is refused at start."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "config.toml"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DIALOGUE_")},
           "DIALOGUE_HOME": str(tmp_path / "home"), "DIALOGUE_CONFIG": str(cfg),
           "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "dialogue", "serve", "--db", str(tmp_path / "d.db"),
            "--no-browser", "--port", str(port)]

    cfg.write_text("sse_ping = -1\n")
    bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "sse_ping" in bad.stderr and "Traceback" not in bad.stderr

    cfg.write_text("access_log = true\nsse_ping = 0.5\n")
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz")
                break
            except httpx.TransportError:
                assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
                time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        httpx.get(f"http://127.0.0.1:{port}/nothing-here")
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    recs = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    assert [(r["path"], r["status"]) for r in recs][-2:] == [("/healthz", 200), ("/nothing-here", 404)]
