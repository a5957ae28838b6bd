"""An exported HTML page, opened in a real browser, fetches nothing from the network.

The export is written by `dialogue export --to html` from a dialogue whose note, answer and code
output show images served by local HTTP and HTTPS servers that record every request: a tracking
pixel learns who opened the page and when. Opened from a file, the default export must not reach
them at all; the same export made with `--remote-images` does (which shows the recorders would
have seen a fetch). HTTPS matters: the export's policy once allowed `img-src https:`.
"""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dialogue.service import DialogueService

GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
       b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")


class _Recorder(BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/gif")
        self.send_header("Content-Length", str(len(GIF)))
        self.end_headers()
        self.wfile.write(GIF)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def trackers(tmp_path):
    """{base URL: the list of paths it was asked for}: one HTTP server, and one HTTPS server with
    a throwaway self-signed certificate where openssl is installed."""
    servers = {}
    for scheme in ("http", "https"):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        srv.seen = []  # type: ignore[attr-defined]
        if scheme == "https":
            if not shutil.which("openssl"):
                srv.server_close()
                continue
            key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                            "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                           check=True, capture_output=True, timeout=60)
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(cert, key)
            srv.socket = tls.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers[f"{scheme}://127.0.0.1:{srv.server_port}"] = srv
    yield {base: srv.seen for base, srv in servers.items()}
    for srv in servers.values():
        srv.shutdown()
        srv.server_close()


def _export(tmp_path: Path, db: Path, *extra: str) -> Path:
    out = tmp_path / f"page{len(extra)}.html"
    r = subprocess.run([sys.executable, "-m", "dialogue.cli", "--db", str(db), "export", "Pixels",
                        "--to", "html", "--with-ai", "-o", str(out), *extra],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DIALOGUE_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    return out


def _open(browser, path: Path) -> list[str]:
    """Open the file in a fresh context; every URL the page requested."""
    ctx = browser.new_context(ignore_https_errors=True)  # the test's own certificate
    try:
        page = ctx.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_load_state("networkidle")
        assert page.locator("h1").inner_text() == "Pixels"
        return requests
    finally:
        ctx.close()


def test_an_exported_page_loads_no_remote_image(browser, trackers, tmp_path):
    db = tmp_path / "d.db"
    svc = DialogueService(db)
    try:
        d = svc.create("Pixels")
        svc.add(d.id, "note", "# Pixels\n\n" + " ".join(
            f"![pixel]({base}/note.gif) <img src='{base}/html.gif'>" for base in trackers))
        svc.add(d.id, "prompt", "Hi", response=" ".join(
            f"Hello ![a]({base}/answer.gif)" for base in trackers))
        svc.add(d.id, "code", "show()", outputs=[{
            "output_type": "display_data", "metadata": {},
            "data": {"text/html": "".join(f"<img src='{base}/output.gif'>" for base in trackers),
                     "text/plain": "x"}}])
    finally:
        svc.close()

    requests = _open(browser, _export(tmp_path, db))
    assert all(seen == [] for seen in trackers.values()), trackers
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []

    # the same page with remote images allowed does fetch them: the recorders see the fetches
    _open(browser, _export(tmp_path, db, "--remote-images"))
    want = ["/answer.gif", "/html.gif", "/note.gif", "/output.gif"]
    deadline = time.monotonic() + 20
    while any(sorted(set(seen)) != want for seen in trackers.values()) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {base: sorted(set(seen)) for base, seen in trackers.items()} == \
        {base: want for base in trackers}
