"""In-process tests of the web app: Starlette's TestClient against `create_app` over a real
SQLite file (and, where a test runs something, a real kernel or the bundled model).

`client` runs the app's lifespan (startup recovers cut streams; shutdown stops runs and kernels
and closes the app's service). Tests set things up and check the database through `db`, a second
service on the same file, as another process would: the app's own connection belongs to the
TestClient's event-loop thread.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from dialogue.service import DialogueService
from dialogue.web import create_app

from webutil import BASE


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    for k in ("DIALOGUE_MODEL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


@pytest.fixture
def db_path(env: Path) -> Path:
    return env / "dialogue.db"


@pytest.fixture
def db(db_path: Path):
    svc = DialogueService(db_path)
    yield svc
    svc.close()


@pytest.fixture
def app(db_path: Path):
    return create_app(DialogueService(db_path))


@pytest.fixture
def client(app):
    with TestClient(app, base_url=BASE) as c:
        yield c


