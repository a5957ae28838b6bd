"""Who may use the server (token, Host), what may change things (CSRF), and what a model, a note
or a notebook can put in the page (nothing that runs)."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from starlette.testclient import TestClient

from dialogue.service import DialogueService
from dialogue.web import create_app
from dialogue.web import views as V
from dialogue.web.security import CSP, cookie_name, is_loopback, local_url, split_host

from webutil import BASE, HX, Tags, sse_events


@pytest.fixture
def token_client(db_path):
    app = create_app(DialogueService(db_path), token="s3cret-token", allowed_hosts=None, port=5001)
    with TestClient(app, base_url="http://192.0.2.10:5001") as c:
        yield c


def test_every_request_needs_the_token(token_client, db):
    c = token_client
    d = db.create("Private")
    for path in ("/", f"/d/{d.id}", "/static/app.js", "/static/vendor/htmx/htmx.min.js",
                 f"/d/{d.id}/export/ipynb", "/search?q=x", "/nope"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert "token" in r.text and "Private" not in r.text
    assert c.get("/?token=wrong").status_code == 401
    assert c.get("/", headers={"Authorization": "token wrong"}).status_code == 401
    # a POST without the token changes nothing, whatever else it carries
    assert c.post("/new", data={"name": "x"}, headers=HX).status_code == 401
    assert [x["name"] for x in db.list()] == ["Private"]

    # header forms
    assert c.get("/", headers={"Authorization": "token s3cret-token"}).status_code == 200
    assert c.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200

    # ?token= once: a cookie, and a redirect that takes the token out of the address bar
    r = c.get(f"/d/{d.id}?token=s3cret-token&x=1", follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/d/{d.id}?x=1"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(5001)}=s3cret-token") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert c.get(f"/d/{d.id}").status_code == 200  # the client now sends the cookie
    assert c.get("/static/app.js").status_code == 200
    # with the token, mutations still need the HTMX header
    assert c.post("/new", data={"name": "x"}).status_code == 403
    assert c.post("/new", data={"name": "Second"}, headers=HX).status_code == 200
    assert len(db.list()) == 2


def test_mutations_need_htmx_and_the_same_origin(client, db):
    d = db.create("Target")
    m = db.add(d.id, "code", "x = 1")
    attempts = [
        ("/new", {"name": "csrf"}, {}),
        (f"/d/{d.id}/delete", {}, {}),
        (f"/d/{d.id}/m/{m.id}/save", {"source": "pwned", "version": "1"}, {}),
        (f"/d/{d.id}/m/{m.id}/run", {}, {"HX-Request": "false"}),
        (f"/d/{d.id}/m/{m.id}/save", {"source": "pwned"},
         {**HX, "Origin": "http://evil.example"}),
        (f"/d/{d.id}/m/{m.id}/save", {"source": "pwned"}, {**HX, "Sec-Fetch-Site": "cross-site"}),
        (f"/d/{d.id}/m/{m.id}/save", {"source": "pwned"}, {**HX, "Sec-Fetch-Site": "same-site"}),
        (f"/d/{d.id}/m/{m.id}/save", {"source": "pwned"}, {**HX, "Origin": "null"}),
    ]
    for path, data, headers in attempts:
        r = client.post(path, data=data, headers=headers)
        assert r.status_code == 403, (path, headers)
        assert "Refused" in r.text
    assert [x["name"] for x in db.list()] == ["Target"]
    assert db.message(d.id, m.id).source == "x = 1" and db.message(d.id, m.id).version == 1
    # the page's own requests pass: same origin, HX-Request
    ok = client.post(f"/d/{d.id}/m/{m.id}/save", data={"source": "x = 2", "version": "1"},
                     headers={**HX, "Origin": BASE, "Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200 and db.message(d.id, m.id).source == "x = 2"
    # and reading stays possible with a plain GET
    assert client.get(f"/d/{d.id}").status_code == 200


def test_without_a_token_only_loopback_host_names_are_answered(client, db):
    """DNS rebinding: a site that points its own name at 127.0.0.1 sends its own Host."""
    for host in ("attacker.example:5001", "attacker.example", "127.0.0.1.nip.io:5001"):
        r = client.get("/", headers={"Host": host})
        assert r.status_code == 421 and "answers only on" in r.text, host
        r = client.post("/new", data={"name": "x"}, headers={**HX, "Host": host})
        assert r.status_code == 421
    assert db.list() == []
    for host in ("localhost:5001", "127.0.0.1:5001", "[::1]:5001", "localhost"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host


def test_security_headers_on_every_response(client, db):
    d = db.create("H")
    for path in ("/", f"/d/{d.id}", "/static/app.js", "/nope"):
        r = client.get(path)
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-frame-options"] == "DENY"
    assert "script-src 'self';" in CSP and "unsafe-eval" not in CSP
    assert "'unsafe-inline'" not in CSP.split("script-src")[1].split(";")[0]


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("127.1.2.3") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert not is_loopback("example.com") and not is_loopback("::")


# ---------------------------------------------------------------- XSS corpus

PAYLOADS = [
    "<script>alert('xss1')</script>",
    "<img src=x onerror=alert('xss2')>",
    "<svg onload=alert('xss3')><circle r=1 /></svg>",
    "<a href=\"javascript:alert('xss4')\">click</a>",
    "[click](javascript:alert('xss5'))",
    "[click](JaVaScRiPt:alert('xss6'))",
    "<a href=\"&#106;avascript:alert('xss7')\">click</a>",
    "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">data</a>",
    "<iframe src=\"javascript:alert('xss8')\"></iframe>",
    "<object data=\"javascript:alert('xss9')\"></object><embed src=\"javascript:alert('xss10')\">",
    "<form action=\"javascript:alert('xss11')\"><button formaction=\"javascript:alert(1)\">go</button></form>",
    "<details open ontoggle=alert('xss12')><summary>s</summary></details>",
    "<body onload=alert('xss13')>",
    "<style>body{display:none}</style><div style=\"background:url(javascript:alert('xss14'))\">s</div>",
    "<base href=\"javascript:alert('xss15')//\">",
    "<meta http-equiv=\"refresh\" content=\"0;url=javascript:alert('xss16')\">",
    "<input autofocus onfocus=alert('xss17')>",
    "![img](x\" onerror=\"alert('xss18'))",
    "<scr<script>ipt>alert('xss19')</script>",
    "\"><script>alert('xss20')</script>",
    "</textarea><script>alert('xss21')</script>",
    "<math><mi xlink:href=\"javascript:alert('xss22')\">m</mi></math>",
    "<noscript><p title=\"</noscript><img src=x onerror=alert('xss23')>\"></noscript>",
    "<template><script>alert('xss24')</script></template>",
    # htmx acts on attributes in swapped HTML: these must not survive either
    "<div hx-post=\"/evil-xss25\" hx-trigger=\"load\">htmx</div>",
    "<img src=x hx-get=\"/evil-xss26\" hx-trigger=\"load\" sse-connect=\"/evil\">",
    "<button data-act=\"delete\" hx-vals='{\"a\": \"evil-xss27\"}'>b</button>",
    "<a href=\"/\" hx-boost=\"true\" hx-target=\"#evil-xss28\">boosted</a>",
]
MARKER = re.compile(r"xss\d+|evil")


def _assert_inert(page: str) -> None:
    t = Tags(page)
    ours = [a for tag, a in t.tags if tag == "script" and (a.get("src") or "").startswith("/static/")]
    assert len(re.findall(r"<script\b", page, re.I)) == len(ours), "a <script> that is not ours"
    for tag, attrs in t.tags:
        if tag == "script":
            assert (attrs.get("src") or "").startswith("/static/"), attrs
        if tag == "iframe":
            # an HTML output of code: its document may hold anything, the frame may not run it
            assert attrs.get("sandbox") == "", attrs
            assert set(attrs) <= {"srcdoc", "sandbox", "class", "style", "title", "loading"}
            continue
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name, value)
            v = (value or "").strip().lower()
            if name in ("href", "src", "action", "formaction", "xlink:href", "data"):
                assert not v.startswith(("javascript:", "data:text", "vbscript:")), (tag, name, v)
            if name not in ("value",):  # an input may show the text as text
                assert not MARKER.search(value or ""), (tag, name, value)
        assert tag not in ("object", "embed", "base", "meta") or tag == "meta" and \
            set(attrs) <= {"charset", "name", "content"} and "evil" not in str(attrs), (tag, attrs)
        if tag == "meta":
            assert "http-equiv" not in attrs
        if tag == "form":
            assert not MARKER.search(str(attrs)), attrs


def test_xss_payloads_in_answers_notes_prompts_and_outputs_render_inert(client, db):
    d = db.create("XSS")
    body = "\n\n".join(PAYLOADS)
    db.add(d.id, "note", body)
    db.add(d.id, "prompt", body, response=body,
           tool_calls=[{"id": "c1", "name": "<script>alert('xss30')</script>",
                        "arguments": {"q": "<img src=x onerror=alert('xss31')>"},
                        "result": body}],
           meta={"error": "<script>alert('xss32')</script>"})
    db.add(d.id, "raw", body)
    db.add(d.id, "code", body, outputs=[
        {"output_type": "stream", "name": "stdout", "text": body},
        {"output_type": "display_data", "metadata": {}, "data": {"text/html": body,
                                                                  "text/plain": "x"}},
        {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": body}},
        {"output_type": "display_data", "metadata": {},
         "data": {"image/svg+xml": "<svg onload=alert('xss33')></svg>"}},
        {"output_type": "error", "ename": "<b>E</b>", "evalue": body, "traceback": [body]}])
    db.add(d.id, "note", body, collapsed=True)
    page = client.get(f"/d/{d.id}").text
    _assert_inert(page)
    # the code's HTML output went into a sandboxed frame, whole
    frames = Tags(page).find("iframe")
    assert len(frames) == 1 and "xss25" in frames[0]["srcdoc"]
    # each cell fragment and the history too
    for m in db.open(d.id).messages:
        _assert_inert(client.get(f"/d/{d.id}/m/{m.id}", headers=HX).text)
        _assert_inert(client.get(f"/d/{d.id}/m/{m.id}/history", headers=HX).text)
    _assert_inert(client.get("/search", params={"q": "alert"}, headers=HX).text)


def test_a_hostile_dialogue_name_stays_text(client, db):
    name = "\"><script>alert('xss40')</script><img src=x onerror=alert(1)>"
    d = db.create(name)
    for page in (client.get("/").text, client.get(f"/d/{d.id}").text):
        t = Tags(page)
        assert all((a.get("src") or "").startswith("/static/") for tag, a in t.tags
                   if tag == "script")
        assert not any(k.startswith("on") for _, a in t.tags for k in a)
        assert name in "".join(t.text) or any(a.get("value") == name for _, a in t.tags)


def test_streamed_text_is_escaped_and_framed_exactly():
    chunk = "<img src=x onerror=alert(1)>\n\nnext\r\nline\rend\n"
    html = V.text_chunk(chunk)
    assert "<img" not in html and "&lt;img" in html
    framed = V.sse("text", html)
    assert framed.endswith("\n\n") and "\r" not in framed
    (event, data), = sse_events(framed)
    assert event == "text"
    assert data == html.replace("\r\n", "\n").replace("\r", "\n")
    assert sse_events(V.sse("close", "")) == [("close", "")]


@pytest.mark.parametrize("raw", [p for p in PAYLOADS if p.startswith("<") and "template" not in p
                                 and "noscript" not in p and "style>" not in p])
def test_the_inertness_check_catches_each_payload_left_raw(raw):
    """The check above is only worth something if it fails on what it looks for."""
    with pytest.raises(AssertionError):
        _assert_inert(f"<html><body><div>{raw}</div></body></html>")


# ---------------------------------------------------------------- Host, strictly

BAD_HOSTS = ["127.0.0.1:5001@evil.example", "localhost@evil.example", "evil.example@127.0.0.1",
             "127.0.0.1:5001/evil", "127.0.0.1:5001:5002", "127.0.0.1 evil.example",
             "[::1]evil.example", "[::1]:5001@evil.example", "[evil.example]:5001",
             "localhost:http", "localhost:99999", "127.0.0.1:", "localhost..", "", "::1:5001"]


def test_split_host_reads_only_host_and_port():
    assert split_host("127.0.0.1:5001") == ("127.0.0.1", "5001")
    assert split_host("LocalHost") == ("localhost", "")
    assert split_host("[::1]:5001") == ("[::1]", "5001") and split_host("[::1]") == ("[::1]", "")
    assert split_host("localhost.:80") == ("localhost", "80")  # the absolute form of a name
    assert split_host("my-box.lan:5001") == ("my-box.lan", "5001")
    for bad in BAD_HOSTS:
        assert split_host(bad) is None, bad


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_malformed_host_is_refused(client, token_client, db, host):
    """`127.0.0.1:PORT@evil.example` once passed as 127.0.0.1: the part before the first colon."""
    db.create("Mine")
    for c, auth in ((client, {}), (token_client, {"Authorization": "token s3cret-token"})):
        r = c.get("/", headers={"Host": host, **auth})
        assert r.status_code in (400, 421), (host, r.status_code)
        assert "Mine" not in r.text
        r = c.post("/new", data={"name": "x"}, headers={**HX, "Host": host, **auth})
        assert r.status_code in (400, 421), host
    assert [x["name"] for x in db.list()] == ["Mine"]


def test_local_url_connects_to_the_bound_address():
    assert local_url("127.0.0.1", 5001) == "http://127.0.0.1:5001/"
    assert local_url("0.0.0.0", 5001) == "http://127.0.0.1:5001/"
    assert local_url("", 5001) == "http://127.0.0.1:5001/"
    assert local_url("::", 5001) == "http://[::1]:5001/"  # asyncio binds "::" IPv6-only
    assert local_url("::1", 5001) == "http://[::1]:5001/"
    assert local_url("fd00::2", 80) == "http://[fd00::2]:80/"
    assert local_url("localhost", 5001) == "http://localhost:5001/"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _serve(tmp_path, host: str) -> tuple[subprocess.Popen, str, int]:
    """`dialogue serve --host HOST` in its own process; returns it, the URL it printed and its
    port, once that URL accepts connections."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path / "home"),
           "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "dialogue.cli", "--db", str(tmp_path / "d.db"),
                          "serve", "--host", host, "--port", str(port), "--no-browser"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = p.stdout.readline()
    m = re.search(r"at (http://\S+)", line)
    assert m, line + (p.stdout.read() if p.poll() is not None else "")
    url = m.group(1)
    u = httpx.URL(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((u.host, u.port), timeout=0.5).close()
            return p, url, port
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise AssertionError(f"{url} does not connect: " + line + p.stdout.read())
            time.sleep(0.1)


def _raw_get(port: int, host_header: str, token: str) -> int:
    """A GET sent byte for byte (an HTTP client would refuse to send such a Host)."""
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host_header}\r\nAuthorization: token {token}\r\n"
                  "Connection: close\r\n\r\n".encode())
        head = s.recv(4096).decode("latin-1")
    return int(head.split()[1])


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_serve_on_ipv6_prints_a_url_that_connects(tmp_path):
    p, url, port = _serve(tmp_path, "::")
    try:
        assert url.startswith(f"http://[::1]:{port}/?token="), url
        token = url.split("token=", 1)[1]
        with httpx.Client(follow_redirects=True) as c:
            r = c.get(url)
            assert r.status_code == 200 and "dialogue" in r.text
        assert _raw_get(port, f"[::1]:{port}", token) == 200
        assert _raw_get(port, f"[::1]:{port}@evil.example", token) == 400
        assert _raw_get(port, f"127.0.0.1:{port}@evil.example", token) == 400
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
    p, url, port = _serve(tmp_path, "::1")
    try:
        assert url == f"http://[::1]:{port}/"  # loopback: no token
        assert httpx.get(url).status_code == 200
        assert httpx.get(url, headers={"Host": f"localhost:{port}@evil.example"}).status_code == 400
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
