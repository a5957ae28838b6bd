"""The web's layout: every route is declared from web.paths and every link is made from there,
handlers are module-level functions that a router serves on its own, and the models offered are
the service's."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fasthtml.common import FastHTML
from starlette.testclient import TestClient

from dialogue.service import DialogueService
from dialogue.web import paths
from dialogue.web.common import Site
from dialogue.web.paths import Route
from dialogue.web.routes import ROUTERS, cells, runs, settings

from webutil import BASE, HX, Tags


def test_a_route_fills_its_pattern_and_sends_the_rest_as_a_query():
    assert paths.run_cell.to(did="d1", mid="m2") == "/d/d1/m/m2/run"
    assert paths.export.to(did="d1", fmt="md", ai=1) == "/d/d1/export/md?ai=1"
    assert paths.export.to(did="d1", fmt="md", ai=None) == "/d/d1/export/md"  # None: left out
    assert paths.run_all_stream.to(did="d", **{"from": 3}) == "/d/d/run_all/stream?from=3"
    assert paths.cell.to(did="a/b", mid="c d") == "/d/a%2Fb/m/c%20d"  # a value stays one segment
    assert paths.static.params == ["path"] and paths.cell.params == ["did", "mid"]
    with pytest.raises(KeyError, match="needs mid"):
        paths.cell.to(did="d1")


def test_every_route_is_declared_from_paths_and_handlers_make_their_own_links(app):
    declared = {r.path for r in app.routes if getattr(r, "path", None)}
    named = {v for v in vars(paths).values() if isinstance(v, Route)}
    assert declared == named, (declared ^ named)
    # a handler is a module-level function whose .to() gives the link to it
    assert runs.run_cell.to(did="d1", mid="m1") == paths.run_cell.to(did="d1", mid="m1")
    assert str(settings.kernel) == paths.kernel


def test_the_views_write_no_url_by_hand():
    """Links come from web.paths: no "/d/..." path is spelled out in the views or the routes."""
    web = Path(paths.__file__).parent
    hand = []
    for f in [web / "views.py", web / "app.py", *(web / "routes").glob("*.py")]:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"""["'](/d/|/m/|/search|/new|/import)""", line):
                hand.append(f"{f.name}:{i}: {line.strip()}")
    assert not hand, "\n".join(hand)


def test_a_router_serves_its_handlers_on_its_own(db_path: Path, db: DialogueService):
    """The cells and runs routers, mounted alone on a bare app, edit and run a cell."""
    d = db.create("Alone")
    m = db.add(d.id, "code", "print(6 * 7)")
    app = FastHTML()
    app.state.site = Site(DialogueService(db_path))
    cells.rt.to_app(app)
    runs.rt.to_app(app)
    with TestClient(app, base_url=BASE) as c:
        r = c.post(cells.save.to(did=d.id, mid=m.id), data={"source": "print(6 * 9)",
                                                            "version": str(m.version)}, headers=HX)
        assert r.status_code == 200 and Tags(r.text).find("div", id=f"m-{m.id}")
        assert c.post(runs.run_cell.to(did=d.id, mid=m.id), headers=HX).status_code == 200
        with c.stream("GET", runs.cell_stream.to(did=d.id, mid=m.id)) as s:
            body = "".join(s.iter_text())
        assert "54" in body and "event: done" in body
    assert db.message(d.id, m.id).outputs[0]["text"] == "54\n"
    app.state.site.service.close()
    # every module of web/routes/ contributes its router, once
    import pkgutil
    from dialogue.web import routes
    mods = [m.name for m in pkgutil.iter_modules(routes.__path__)]
    assert sorted(ROUTERS, key=id) == sorted({getattr(routes, m).rt for m in mods}, key=id)


def test_the_model_picker_offers_the_services_ready_models(client, db, monkeypatch):
    d = db.create("Models")
    html = client.get(f"/d/{d.id}").text
    picker = re.search(r'<select[^>]*id="model".*?</select>', html, re.S).group(0)
    offered = [a.get("value") for t, a in Tags(picker).tags if t == "option"]
    ready = [i.name for i in db.models() if i.ready and not i.template]
    assert offered and set(offered) <= set(ready) | {d.model}
    assert "claude-sonnet-4-5" not in offered  # no key set (conftest): a hosted model is not ready
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")  # with a key it is (after the short cache)
    client.app.state.site.models.ttl = 0
    picker = re.search(r'<select[^>]*id="model".*?</select>', client.get(f"/d/{d.id}").text, re.S)
    assert "claude-sonnet-4-5" in picker.group(0)
