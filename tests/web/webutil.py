"""Helpers for the web app's tests: request headers, an HTML tag walker, SSE decoders, the app
under a real uvicorn."""
from __future__ import annotations

import contextlib
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Iterator

import httpx

HX = {"HX-Request": "true"}
BASE = "http://127.0.0.1:5001"


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, and the text outside tags."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags
                if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def sse_events(body: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body, decoded as EventSource does."""
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
        out.append((event, "\n".join(data)))
    return out


def line_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a streamed response's lines (httpx `iter_lines`), as they arrive."""
    event, data = "message", []
    for line in lines:
        if line == "":
            if data or event != "message":
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])


@contextlib.contextmanager
def live_server(db_path: Path, timeout: float = 60, **app_options) -> Iterator[httpx.Client]:
    """The app under a real uvicorn on 127.0.0.1 in a thread, and a client for it: for what the
    in-process TestClient cannot do (read a stream as it arrives, cut it halfway). `app_options`
    go to create_app."""
    import uvicorn

    from dialogue.service import DialogueService
    from dialogue.web import create_app
    app = create_app(DialogueService(db_path), **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=2))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=HX, timeout=timeout) as c:
            yield c
    finally:
        server.should_exit = True
        t.join(30)
