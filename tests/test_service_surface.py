"""What the service gives the surfaces so that they need nothing else (tests/test_layout.py):
model names checked wherever a model is set, the models every provider offers, attached context
added and removed, from Python, the CLI (a real process) and the Python handle alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dialogue import Dialogue
from dialogue.llm.base import UnknownModelError
from dialogue.service import DialogueService, NotFoundError, ProviderError


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A models registry of our own."""
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def svc(tmp_path, home):
    s = DialogueService(tmp_path / "s.db")
    yield s
    s.close()


def cli(tmp_path: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIALOGUE_DB": str(tmp_path / "cli.db"), "COLUMNS": "200",
           "DIALOGUE_HOME": str(tmp_path / "home"), "DIALOGUE_CACHE_DIR": str(tmp_path / "kv")}
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, input=input, timeout=120)


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 60)  # the header the registry checks; never loaded here
    return path


# ---------------------------------------------------------------- model names

@pytest.mark.parametrize("bad", ["nonsense-model", "local:no-such-model", "openai-compatible:x",
                                 "local:/nowhere/m.gguf"])
def test_a_model_no_provider_serves_is_refused_wherever_it_is_set(svc, bad):
    with pytest.raises(UnknownModelError):
        svc.create("d", model=bad)
    assert svc.list() == []  # nothing was created
    d = svc.create("d")
    with pytest.raises(UnknownModelError):
        svc.update("d", model=bad)
    with pytest.raises(ProviderError):
        Dialogue(d.id, db=svc.path).model = bad
    with pytest.raises(UnknownModelError, match="empty"):
        svc.update("d", model=" ")
    assert svc.open("d").model == d.model and svc.open("d").version == d.version


def test_a_known_model_without_its_key_is_accepted(svc, monkeypatch):
    """The key may be set before the first prompt; a missing key is reported when one runs."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert svc.create("c", model="claude-sonnet-4-5").model == "claude-sonnet-4-5"
    assert svc.update("c", model="gpt-4.1-mini").model == "gpt-4.1-mini"


def test_the_cli_refuses_an_unknown_model_before_touching_anything(tmp_path):
    r = cli(tmp_path, "new", "x", "--model", "nonsense-model")
    assert r.returncode == 1 and r.stderr.startswith("error: unknown model 'nonsense-model'")
    assert len(r.stderr.strip().splitlines()) == 1
    assert cli(tmp_path, "new", "x").returncode == 0
    r = cli(tmp_path, "run", "x", "--model", "local:nope")
    assert r.returncode == 1 and "unknown local model 'nope'" in r.stderr
    assert "local:default" in cli(tmp_path, "show", "x").stdout  # the dialogue kept its model


# ---------------------------------------------------------------- listing models

def test_models_lists_local_and_hosted_ones_and_says_which_are_ready(svc, home, tmp_path,
                                                                      monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    mine = fake_gguf(tmp_path / "mine.gguf")
    svc.add_model(mine, name="mine")
    by_name = {m.name: m for m in svc.models()}
    assert by_name["local:default"].ready  # the bundled model is installed in the test env
    assert by_name["local:mine"].ready and by_name["local:mine"].where == str(mine.resolve())
    assert not by_name["claude-sonnet-4-5"].ready
    assert "ANTHROPIC_API_KEY" in by_name["claude-sonnet-4-5"].about
    assert by_name["gpt-4.1-mini"].ready
    assert [m.template for m in svc.models() if m.name.startswith("openai-compatible:")] == [True]
    names = [m.name for m in svc.models()]
    assert names.index("local:mine") < names.index("claude-sonnet-4-5")  # local ones first
    for m in svc.models():  # every offered name is one the check accepts
        if not m.template:
            svc.check_model(m.name)
    mine.unlink()
    gone = {m.name: m for m in svc.models()}["local:mine"]
    assert not gone.ready and "missing" in gone.about
    svc.remove_model("mine")
    assert "local:mine" not in {m.name for m in svc.models()}


def test_an_unreadable_registry_is_listed_not_raised(svc, home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.json").write_text("{broken")
    odd = [m for m in svc.models() if m.name == "local:<registered>"]
    assert len(odd) == 1 and "unreadable" in odd[0].about and not odd[0].ready


def test_cli_models_add_list_rm(tmp_path):
    gguf = fake_gguf(tmp_path / "tiny.gguf")
    r = cli(tmp_path, "models", "add", str(gguf), "--name", "tiny")
    assert r.returncode == 0 and "added local:tiny" in r.stdout
    listed = cli(tmp_path, "models").stdout
    assert "local:tiny" in listed and "local:default" in listed and "claude-sonnet-4-5" in listed
    assert "openai-compatible:<base_url>/<model>" in listed
    assert cli(tmp_path, "new", "t", "--model", "local:tiny").returncode == 0
    assert cli(tmp_path, "models", "rm", "tiny").returncode == 0
    assert "local:tiny" not in cli(tmp_path, "models").stdout


# ---------------------------------------------------------------- attached context

def test_attach_and_detach_through_the_service(svc, tmp_path):
    d = svc.create("d")
    f = tmp_path / "schema.sql"
    f.write_text("create table t (x int);", encoding="utf-8")
    d = svc.attach_file("d", f)
    assert [(c.name, c.kind, c.source) for c in d.context] == [("schema.sql", "file", str(f))]
    d = svc.attach("d", "schema.sql", "replaced")  # same name: replaced, not doubled
    assert [c.content for c in d.context] == ["replaced"]
    with pytest.raises(NotFoundError, match="attached: 'schema.sql'"):
        svc.detach("d", "nope")
    from dialogue.service import ConflictError
    with pytest.raises(ConflictError):
        svc.detach("d", "schema.sql", base_version=d.version - 1)  # a stale page
    assert svc.detach("d", "schema.sql").context == []


def test_cli_attach_detach_and_the_prompt_sees_it(tmp_path):
    assert cli(tmp_path, "new", "d").returncode == 0
    f = tmp_path / "notes.md"
    f.write_text("the walrus is 3 m long", encoding="utf-8")
    r = cli(tmp_path, "attach", "d", str(f))
    assert r.returncode == 0 and "attached notes.md (22 characters, 8 tokens)" in r.stdout  # the model's tokenizer
    r = cli(tmp_path, "attach", "d", "-", "--as", "piped", input="from stdin")
    assert r.returncode == 0
    shown = cli(tmp_path, "show", "d").stdout
    assert "attached: notes.md" in shown and "attached: piped" in shown
    # what a prompt of the dialogue is sent
    from dialogue import context
    s = DialogueService(tmp_path / "cli.db")
    m = s.add("d", "prompt", "how long?")
    import json
    assert "the walrus is 3 m long" in json.dumps(context.build(s.open("d"), m.id).to_dict())
    s.close()
    r = cli(tmp_path, "detach", "d", "nope")
    assert r.returncode == 1 and "no attached item 'nope'" in r.stderr
    assert cli(tmp_path, "attach", "d", "-", input="x").returncode == 1  # stdin needs --as
    assert cli(tmp_path, "attach", "d", str(tmp_path / "missing.txt")).returncode == 1
    assert cli(tmp_path, "detach", "d", "notes.md").returncode == 0
    shown = cli(tmp_path, "show", "d").stdout
    assert "notes.md" not in shown and "attached: piped" in shown


# ---------------------------------------------------------------- the prefix cache

def test_cli_cache_stats_and_clear_after_a_real_answer(tmp_path):
    """The bundled model answers one short prompt; its system prompt's state lands in the
    cache that `dialogue cache` reports and `cache clear` empties."""
    assert cli(tmp_path, "new", "c", "--system", "You answer in one word.").returncode == 0
    s = DialogueService(tmp_path / "cli.db")
    s.update("c", meta={"max_tokens": 4})
    s.close()
    r = cli(tmp_path, "ask", "c", "Say hi.")
    assert r.returncode == 0, r.stderr
    stats = cli(tmp_path, "cache").stdout
    assert stats.startswith(str(tmp_path / "kv")) and " 0 states" not in stats.splitlines()[0]
    # the counters are the folder's: the model's own process counted, this process reads them
    assert "hit rate 0%: 0 of 1 lookups found a saved prefix" in stats.splitlines()[1]
    r = cli(tmp_path, "ask", "c", "Say hi.")  # a new process: the system prompt's state is on disk
    assert r.returncode == 0, r.stderr
    js = json.loads(cli(tmp_path, "cache", "stats", "--json").stdout)
    assert (js["hits"], js["lookups"], js["hit_rate"]) == (1, 2, 0.5) and js["saves"] >= 1
    r = cli(tmp_path, "cache", "clear")
    assert r.returncode == 0 and "deleted" in r.stdout and " 0 cached" not in r.stdout
    after = cli(tmp_path, "cache").stdout.splitlines()
    assert " 0 states" in after[0] and after[1].startswith("no lookups yet")  # counters start over


def test_the_python_handle_attaches_and_detaches(tmp_path, home):
    d = Dialogue.create("h", db=tmp_path / "h.db")
    f = tmp_path / "rules.txt"
    f.write_text("no tabs", encoding="utf-8")
    d.attach(f)
    d.attach(name="style", content="short lines")
    assert [(c.name, c.content) for c in d.context] == [("rules.txt", "no tabs"),
                                                        ("style", "short lines")]
    with pytest.raises(ValueError):
        d.attach(f, content="both")
    d.detach("rules.txt")
    assert [c.name for c in Dialogue.open("h", db=tmp_path / "h.db").context] == ["style"]
    with pytest.raises(NotFoundError):
        d.detach("rules.txt")
