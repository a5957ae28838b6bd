"""Who may talk to the server, and what the browser may do with the page.

One ASGI middleware in front of every route (pages, fragments, the event streams and the static
files) so that nothing is reachable around it. It is plain ASGI rather than FastHTML Beforeware
because Beforeware runs after FastHTML has parsed the request body (an unauthenticated 100 MB upload
would be read before being refused) and does not see mounts or 404s.

- Token: when the server has one (always when it listens beyond the loopback interface), every
  request carries it, as `?token=...` once (answered with a cookie and a redirect that drops it from
  the address bar, as Jupyter does), as the cookie, or as an `Authorization: token ...` /
  `Bearer ...` header.
- DNS rebinding: a server without a token answers only requests whose Host is a loopback name, so a
  web page that points its own domain at 127.0.0.1 cannot read or drive it. Host is parsed strictly
  (`split_host`): a header that is not `host[:port]` is refused, token or not.
- Health checks: `GET /healthz` (`PUBLIC_PATHS`) needs no token, because a supervisor or a proxy
  probing the server does not have it; it answers only `{"status": "ok"}`. Its Host is still
  checked like every request's: a supervisor on this machine sends a loopback name, and a page
  that rebinds its domain to 127.0.0.1 learns nothing it could not learn by failing to connect.
- CSRF: a request that changes anything must be POST (or another non-safe method) and carry
  `HX-Request: true`. A cross-site form cannot set that header, and a cross-site script that sets
  it triggers a CORS preflight we never approve. A request that says where it comes from (Origin,
  Sec-Fetch-Site) must say "this origin".
- Headers: a Content-Security-Policy that allows scripts only from our own /static files (no inline
  script, no eval), no framing of the app, no referrer (the token may be in a URL).
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit

from . import paths

__all__ = ["Guard", "LOOPBACK_NAMES", "is_loopback", "new_token", "CSP", "cookie_name",
           "split_host", "local_url"]

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({paths.healthz})  # read without the token (see the module docstring)

# Inline styles stay allowed: CodeMirror and htmx set style attributes, and a style cannot run
# code. Images may be data: URIs (plots from code cells). Frames: only the srcdoc iframes that hold
# HTML outputs of code, which are sandboxed without scripts or same-origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; frame-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def local_url(host: str, port: int) -> str:
    """The URL that reaches a server bound to `host` from this machine. A wildcard address is not
    one to connect to: "0.0.0.0" (and "", every interface) is reached on 127.0.0.1, but "::" on
    [::1], because asyncio binds IPv6 sockets IPv6-only (IPV6_V6ONLY), so 127.0.0.1 is refused
    there. Other addresses and names are used as given, IPv6 ones in brackets."""
    h = host.strip().strip("[]")
    if h in ("", "0.0.0.0"):
        h = "127.0.0.1"
    else:
        try:
            if ipaddress.ip_address(h).is_unspecified:  # "::", "0:0::0"
                h = "::1"
        except ValueError:
            pass  # a name
    return f"http://{'[' + h + ']' if ':' in h else h}:{port}/"


def cookie_name(port: int | None) -> str:
    """Cookies are shared by every port of a host: a per-port name keeps two servers (or a
    server and a test) from overwriting each other's token."""
    return f"dialogue-token-{port}" if port else "dialogue-token"


# RFC 9110 Host: uri-host [":" port], read strictly: a DNS name or an IPv4 address, or an IPv6
# address in brackets, then at most a decimal port. Anything else ("127.0.0.1:5001@evil.example",
# userinfo, a path, spaces, a second colon) is refused rather than guessed at: a lenient split took
# the part before the first colon and let such a header through as a loopback name. Written out
# because urllib.parse reads "a:1@b" as userinfo and host b, which is a URL's grammar, not Host's.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9](?:[a-z0-9_.-]{0,252}[a-z0-9_])?\.?))"
                   r"(?::(?P<port>[0-9]{1,5}))?")


def split_host(value: str) -> tuple[str, str] | None:
    """A Host header -> (host, port), the host lower-cased and an IPv6 address in brackets as
    sent ("[::1]"), the port "" when absent; None when the header is not a well-formed host."""
    m = _HOST.fullmatch(value.strip().lower())
    if m is None:
        return None
    port = m["port"] or ""
    if port and not 0 < int(port) < 65536:
        return None
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            return None
        return f"[{m['v6']}]", port
    name = m["name"].rstrip(".")
    if any(not label for label in name.split(".")):
        return None
    return name, port


class Guard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, *, token: str | None = None,
                 allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES, port: int | None = None):
        self.app = app
        self.token = token
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.cookie = cookie_name(port)

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "websocket":  # the app has no websocket routes
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._check(scope, headers)
        if refusal is not None:
            status, message, extra = refusal
            await _plain(send, status, message, extra)
            return

        async def send_with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                have = {k.lower() for k, _ in msg.get("headers", [])}
                msg["headers"] = list(msg.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in have]
            await send(msg)

        await self.app(scope, receive, send_with_headers)

    # ------------------------------------------------------------ checks

    def _check(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, list] | None:
        host_header = headers.get("host", "")
        parsed = split_host(host_header)
        if parsed is None:
            return (400, f"Refused: a malformed Host header ({host_header!r}).", [])
        host, _ = parsed
        if self.token is None and self.allowed_hosts is not None and host not in self.allowed_hosts:
            return (421, f"This server answers only on {', '.join(sorted(self.allowed_hosts))} "
                         f"(the request was for {host_header!r}).", [])
        public = scope["path"] in PUBLIC_PATHS and scope["method"] in SAFE_METHODS
        if self.token is not None and not public:
            given = self._given_token(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return (401, "This dialogue server needs its token: open the URL with ?token=... "
                             "that `dialogue serve` printed when it started.", [])
            if scope["method"] == "GET" and self._token_in_query(scope):
                return self._set_cookie_and_redirect(scope)
        if scope["method"] not in SAFE_METHODS:
            if headers.get("hx-request", "").lower() != "true":
                return (403, "Refused: changes are accepted only from the dialogue page "
                             "(the request lacks the HX-Request header).", [])
            site = headers.get("sec-fetch-site")
            if site is not None and site not in ("same-origin", "none"):
                return (403, f"Refused: a cross-site request ({site}).", [])
            origin = headers.get("origin")
            if origin is not None and not self._same_origin(origin, host_header):
                return (403, f"Refused: a request from another origin ({origin}).", [])
        return None

    def _token_in_query(self, scope: Scope) -> bool:
        return any(k == "token" for k, _ in parse_qsl(scope.get("query_string", b"").decode()))

    def _given_token(self, scope: Scope, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        for k, v in parse_qsl(scope.get("query_string", b"").decode()):
            if k == "token":
                return v
        if "cookie" in headers:
            c = SimpleCookie()
            try:
                c.load(headers["cookie"])
            except Exception:  # a malformed Cookie header from some other app on this host
                return None
            if self.cookie in c:
                return c[self.cookie].value
        return None

    def _set_cookie_and_redirect(self, scope: Scope) -> tuple[int, str, list]:
        rest = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode(),
                                             keep_blank_values=True) if k != "token"]
        location = scope.get("root_path", "") + scope["path"] + ("?" + urlencode(rest) if rest else "")
        cookie = (f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict")
        return (303, "Token accepted.", [(b"location", location.encode()),
                                         (b"set-cookie", cookie.encode())])

    @staticmethod
    def _same_origin(origin: str, host_header: str) -> bool:
        if origin == "null":
            return False
        o = urlsplit(origin)
        return bool(o.netloc) and o.netloc.lower() == host_header.strip().lower()


async def _plain(send: Callable, status: int, message: str, extra: list) -> None:
    body = (message + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *extra,
                            *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
