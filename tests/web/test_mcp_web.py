"""The settings panel's MCP servers: listed without starting them, switched on and off per
dialogue (a versioned change), a server's tools or its error shown when opened, escaped; the
servers the app started end with it. A real MCP server (tests/mcp_server.py) over stdio."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from webutil import HX

SERVER = str(Path(__file__).parents[1] / "mcp_server.py")


@pytest.fixture
def servers(env, monkeypatch):
    path = env / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "calc": {"command": sys.executable, "args": [SERVER]},
        "<b>bad</b>": {"command": "/nonexistent/<i>srv</i>"}}}))
    monkeypatch.setenv("DIALOGUE_MCP_CONFIG", str(path))
    return path


def _running() -> list[str]:
    got = subprocess.run(["pgrep", "-af", SERVER], capture_output=True, text=True).stdout
    return [ln for ln in got.splitlines() if "--http" not in ln]


def test_settings_list_switch_and_show_mcp_tools(servers, db, client):
    d = db.create("web-mcp")
    page = client.get(f"/d/{d.id}").text
    assert 'id="mcp-settings"' in page and f'hx-get="/d/{d.id}/mcp"' in page
    got = client.get(f"/d/{d.id}/mcp", headers=HX)
    assert got.status_code == 200
    html = got.text
    assert "<strong>calc</strong>" in html and str(servers) in html
    assert "&lt;b&gt;bad&lt;/b&gt;" in html and "<b>bad</b>" not in html
    assert 'hx-get="/d/' + d.id + '/mcp/tools?name=calc"' in html
    assert "checked" not in html.split("calc")[0].rsplit("<input", 1)[-1]
    assert _running() == []  # listing starts nothing
    got = client.post(f"/d/{d.id}/mcp", data={"name": "calc", "on": "on",
                                               "dversion": str(d.version)}, headers=HX)
    assert got.status_code == 200, got.text
    assert 'id="dversion"' in got.text and "MCP server calc on" in got.text
    d2 = db.open(d.id, messages=False)
    assert d2.meta["mcp"] == {"enabled": ["calc"]} and d2.version == d.version + 1
    # a stale version is a conflict, and changes nothing
    got = client.post(f"/d/{d.id}/mcp", data={"name": "calc", "dversion": str(d.version)},
                      headers=HX)
    assert got.status_code == 409 and db.open(d.id, messages=False).meta["mcp"]
    tools = client.get(f"/d/{d.id}/mcp/tools", params={"name": "calc"}, headers=HX).text
    assert "<code>calc__add</code>" in tools and "reads only" in tools
    assert "Add two whole numbers." in tools
    assert len(_running()) == 1  # started, and kept for the app's life
    bad = client.get(f"/d/{d.id}/mcp/tools", params={"name": "<b>bad</b>"}, headers=HX).text
    assert "could not start" in bad and "&lt;i&gt;srv&lt;/i&gt;" in bad and "<i>" not in bad
    got = client.post(f"/d/{d.id}/mcp", data={"name": "calc",
                                               "dversion": str(d2.version)}, headers=HX)
    assert got.status_code == 200 and "mcp" not in db.open(d.id, messages=False).meta


def test_the_servers_the_app_started_end_with_it(servers, db, app):
    from starlette.testclient import TestClient
    from webutil import BASE
    d = db.create("ends")
    with TestClient(app, base_url=BASE) as c:
        assert "calc__add" in c.get(f"/d/{d.id}/mcp/tools", params={"name": "calc"},
                                    headers=HX).text
        assert len(_running()) == 1
    assert _running() == []


def test_a_global_file_that_cannot_be_read_is_shown(env, db, client, monkeypatch):
    (env / "mcp.json").write_text("{oops")
    monkeypatch.setenv("DIALOGUE_MCP_CONFIG", str(env / "mcp.json"))
    d = db.create("badfile")
    html = client.get(f"/d/{d.id}/mcp", headers=HX).text
    assert "is not valid JSON" in html and 'class="error"' in html


def test_a_server_enabled_then_taken_out_of_the_file_can_be_switched_off(servers, db, client):
    d = db.set_mcp(db.create("gone").id, enable=["calc"])
    servers.write_text(json.dumps({"mcpServers": {}}))
    html = client.get(f"/d/{d.id}/mcp", headers=HX).text
    assert "<strong>calc</strong>" in html and "configured nowhere now" in html
    got = client.post(f"/d/{d.id}/mcp", data={"name": "calc", "dversion": str(d.version)},
                      headers=HX)
    assert got.status_code == 200 and "mcp" not in db.open(d.id, messages=False).meta
    assert "No MCP servers are configured." in got.text
