"""A real `dialogue` web server in a subprocess and a real headless Chromium driving it.

The server is started the way a user starts it (`dialogue.web.app.serve`, uvicorn on
127.0.0.1), on a free port, with its own database, model registry and KV-cache directory in a
temporary folder. Chromium is Debian's (`/usr/bin/chromium`), driven by pip's `playwright` through
`executable_path`: `playwright install` downloads browsers from the network, which CI does not
allow. Every page records console errors and every request it makes, so a test can check that
nothing failed and nothing left 127.0.0.1.
"""
from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from browserutil import free_port, start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} "
                "(apt-get install chromium); it is not installed", allow_module_level=True)

playwright_sync = pytest.importorskip("playwright.sync_api")


@dataclass
class Server:
    url: str
    db: Path
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    tmp = tmp_path_factory.mktemp("web")
    port = free_port()
    db = tmp / "dialogue.db"
    log = tmp / "server.log"
    proc = start_server(tmp, db, port, log=log)
    yield Server(f"http://127.0.0.1:{port}", db, proc, log)
    proc.send_signal(signal.SIGINT)  # what Ctrl+C does: lifespan shutdown stops every kernel
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the server did not stop on SIGINT:\n{log.read_text()}")


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@dataclass
class Watch:
    """What a page did: console errors, uncaught exceptions, and every URL it requested."""

    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def outside(self, origin: str) -> list[str]:
        return [u for u in self.requests
                if not (u.startswith(origin + "/") or u.startswith(("data:", "about:", "blob:")))]


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(20_000)
    watch = Watch()
    pg.on("console", lambda m: watch.errors.append(f"console {m.type}: {m.text}")
          if m.type == "error" else None)
    pg.on("pageerror", lambda e: watch.errors.append(f"page error: {e}"))
    pg.on("request", lambda r: watch.requests.append(r.url))
    pg.watch = watch
    yield pg
    ctx.close()
