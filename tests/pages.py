"""A real HTTP server on 127.0.0.1 serving fixed pages, for the tests that attach a URL.

``with PageServer({"/doc.html": page("text/html", "<html>...")}) as srv: srv.url("/doc.html")``.
Each route is a `Page` (status, content type, body bytes, extra headers, a delay before the body);
any other path answers 404. `srv.hits` counts requests per path, so a test can tell a refresh
fetched the page again.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Page:
    content_type: str
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def page(content_type: str, body: str | bytes, **kw) -> Page:
    return Page(content_type, body.encode() if isinstance(body, str) else body, **kw)


class PageServer:
    def __init__(self, routes: dict[str, Page]):
        self.routes = routes
        self.hits: Counter[str] = Counter()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                srv.hits[self.path] += 1
                p = srv.routes.get(self.path)
                if p is None:
                    p = Page("text/plain", b"not found", status=404)
                if p.delay:
                    time.sleep(p.delay)
                self.send_response(p.status)
                if p.content_type:
                    self.send_header("Content-Type", p.content_type)
                for k, v in p.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(p.body)))
                self.end_headers()
                try:
                    self.wfile.write(p.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def __enter__(self) -> "PageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
