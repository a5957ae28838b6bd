"""What a user expects of any command-line tool: --version, `python -m dialogue`, options before
or after the command, --json on what lists or reports, a config file, -v logging. Real
processes, real database files, a config file of their own (never the user's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dialogue


def run(*args, env=None, input=None, timeout=300, module="dialogue"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env, input=input, timeout=timeout)


@pytest.fixture
def env(tmp_path):
    """A clean environment: no DIALOGUE_* from the caller, a config path that does not exist yet,
    and registries and caches in the test's folder."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGUE_")}
    e.update(DIALOGUE_CONFIG=str(tmp_path / "config.toml"), DIALOGUE_HOME=str(tmp_path / "home"),
             DIALOGUE_CACHE_DIR=str(tmp_path / "kv"), COLUMNS="200", HF_HUB_OFFLINE="1")
    for k in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY"):
        e.pop(k, None)
    return e


def ok(*args, env, **kw):
    r = run(*args, env=env, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout


def js(*args, env, **kw):
    return json.loads(ok(*args, "--json", env=env, **kw))


# ---------------------------------------------------------------- version, entry points, --db

@pytest.mark.parametrize("module", ["dialogue", "dialogue.cli"])
def test_version(module, env):
    r = run("--version", env=env, module=module)
    assert r.returncode == 0 and r.stdout.strip() == f"dialogue {dialogue.__version__}"


def test_db_is_accepted_before_or_after_the_command(tmp_path, env):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    ok("--db", str(a), "new", "first", env=env)
    ok("new", "second", "--db", str(b), env=env)
    assert [r["name"] for r in js("list", "--db", str(a), env=env)] == ["first"]
    assert [r["name"] for r in js("--db", str(b), "list", env=env)] == ["second"]
    # given twice, the one after the command is nearer the command and wins
    assert [r["name"] for r in js("--db", str(a), "list", "--db", str(b), env=env)] == ["second"]
    # the commands with parsers of their own (adapters, train) take them after their name too
    r = run("adapters", "use", "second", "--db", str(b), "-v", env=env)
    assert r.returncode == 0, r.stderr
    r = run("adapters", "use", "first", "--db", str(b), env=env)
    assert r.returncode != 0 and "first" in r.stderr  # b has no dialogue 'first': b was used
    r = run("train", "--db", str(b), "--help", env=env)
    assert r.returncode == 0 and "--preferences" in r.stdout  # the trainer's own help, whole


# ---------------------------------------------------------------- --json

def test_json_of_every_listing_and_report(tmp_path, env):
    db = str(tmp_path / "j.db")
    env = {**env, "DIALOGUE_DB": db}
    ok("new", "calc", env=env)
    ok("add", "calc", "--code", "x = 6\nprint('hi')\nx * 7", env=env)
    ok("add", "calc", "--code", "1/0", env=env)
    ok("add", "calc", "--note", "gone soon", env=env)

    rows = js("list", env=env)
    assert rows[0]["name"] == "calc" and rows[0]["messages"] == 3

    ran = js("run", "calc", "--allow-errors", env=env)
    assert ran["dialogue"] == "calc" and ran["failed"] == 1 and ran["written"] is None
    assert [(m["kind"], m["status"]) for m in ran["messages"]] == [("code", "ok"), ("code", "error")]
    assert "hi" in ran["messages"][0]["text"] and "42" in ran["messages"][0]["text"]
    assert "ZeroDivisionError" in ran["messages"][1]["text"]
    r = run("run", "calc", "--json", env=env)  # without --allow-errors: the same exit status as ever
    assert r.returncode == 1 and json.loads(r.stdout)["failed"] == 1

    one = js("exec", "calc", "1", env=env)
    assert one["status"] == "ok" and one["execution_count"] == 1 and "hi" in one["text"]  # a new kernel

    mid = ran["messages"][0]["id"]
    hist = js("history", "calc", mid, env=env)
    assert hist and hist[0]["state"]["source"].startswith("x = 6")

    ok("rm", "calc", "3", env=env)
    trash = js("trash", env=env)
    assert [(t["type"], t["name"]) for t in trash] == [("message", "gone soon")]

    models = js("models", env=env)
    names = {m["name"] for m in models}
    assert "local:default" in names and all({"ready", "where", "about"} <= m.keys() for m in models)

    stats = js("cache", "stats", env=env)
    assert stats["root"] == str(tmp_path / "kv") and stats["entries"] == 0
    assert stats["max_bytes"] > 0


def test_ask_json_reports_the_stored_answer_and_nothing_else_on_stdout(tmp_path, env):
    env = {**env, "DIALOGUE_DB": str(tmp_path / "a.db")}
    ok("new", "qa", "--model", "local:default", env=env)
    r = run("ask", "qa", "Name the largest planet in the solar system.", "--json", "-v", env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)  # the whole of stdout is one JSON document; the log is on stderr
    assert any(" INFO dialogue.local.process: model smollm2 loaded in " in ln
               for ln in r.stderr.splitlines()), r.stderr
    assert rec["kind"] == "prompt" and rec["status"] == "ok" and "Jupiter" in rec["response"]
    assert rec["usage"]["output"] > 0 and rec["error"] is None
    shown = json.loads(ok("show", "qa", "--json", env=env))["messages"][0]
    assert shown["id"] == rec["id"] and shown["response"] == rec["response"]


# ---------------------------------------------------------------- config file

def test_settings_come_from_the_environment_then_the_config_file_then_defaults(tmp_path, env):
    db = str(tmp_path / "c.db")
    env = {**env, "DIALOGUE_DB": db}
    cfg = Path(env["DIALOGUE_CONFIG"])

    def model_of_new(name, e):
        ok("new", name, env=e)
        return next(r["model"] for r in js("list", env=e) if r["name"] == name)

    assert model_of_new("by-default", env) == "local:default"  # no file, no variable
    cfg.write_text('model = "local:gemma3-270m"\n')
    assert model_of_new("by-file", env) == "local:gemma3-270m"
    assert model_of_new("by-env", {**env, "DIALOGUE_MODEL": "local:smollm2"}) == "local:smollm2"

    # the file's db is used when neither --db nor DIALOGUE_DB says otherwise; --db beats both
    other = tmp_path / "from-file.db"
    cfg.write_text(f'db = "{other}"\n')
    e = {k: v for k, v in env.items() if k != "DIALOGUE_DB"}
    ok("new", "in-file-db", env=e)
    assert other.exists() and [r["name"] for r in js("list", env=e)] == ["in-file-db"]
    assert "in-file-db" not in {r["name"] for r in js("list", env=env)}
    assert js("list", "--db", str(tmp_path / "x.db"), env=e) == []


@pytest.mark.parametrize("text,why", [
    ("model = \n", "not valid TOML"),
    ('modle = "x"\n', "unknown setting 'modle'"),
    ('stop_grace = "soon"\n', "stop_grace must be float"),
    ("access_log = 1\n", "access_log must be bool"),
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, env, text, why):
    Path(env["DIALOGUE_CONFIG"]).write_text(text)
    r = run("list", "--db", str(tmp_path / "d.db"), env=env)
    assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and env["DIALOGUE_CONFIG"] in r.stderr
    assert not (tmp_path / "d.db").exists()


def test_apply_fills_only_what_the_environment_leaves_unset(tmp_path):
    from dialogue import config
    p = tmp_path / "c.toml"
    p.write_text('model = "a"\nthreads = 3\nllama_repack = true\nsse_ping = 2.5\n')
    environ = {"DIALOGUE_MODEL": "b"}
    added = config.apply(environ, p)
    assert environ == {"DIALOGUE_MODEL": "b", "DIALOGUE_THREADS": "3", "DIALOGUE_LLAMA_REPACK": "1",
                       "DIALOGUE_SSE_PING": "2.5"}
    assert "DIALOGUE_MODEL" not in added
    assert config.get("threads", environ) == "3" and config.flag("llama_repack", environ)
    assert config.get("log_level", environ) is None
    assert config.config_path({"DIALOGUE_CONFIG": str(p)}) == p


def test_every_dialogue_variable_the_code_reads_is_a_setting_and_in_the_readme():
    """One place documents them all: a variable read anywhere in src/ is in config.SETTINGS (or
    is one of the test suite's hooks) and in the README's table."""
    import re

    from dialogue import config
    root = Path(dialogue.__file__).parent
    read = set()
    for f in root.rglob("*.py"):
        read |= set(re.findall(r'"(DIALOGUE_[A-Z_]+)"', f.read_text("utf-8")))
    test_only = {"DIALOGUE_TEST_HOOKS", "DIALOGUE_TEST_CRASH_FILE", config.CONFIG_ENV}
    assert read - test_only <= {s.env for s in config.SETTINGS}
    readme = (root.parents[1] / "README.md").read_text("utf-8")
    missing = [s.env for s in config.SETTINGS if f"`{s.env}`" not in readme]
    assert not missing, f"README lacks {missing}"
    assert f"`{config.CONFIG_ENV}`" in readme


# ---------------------------------------------------------------- logging

def test_verbose_logs_what_the_kernel_and_the_service_do(tmp_path, env):
    env = {**env, "DIALOGUE_DB": str(tmp_path / "v.db")}
    ok("new", "v", env=env)
    ok("add", "v", "--code", "print(1)", env=env)
    quiet = run("exec", "v", "1", env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = run("exec", "v", "1", "-v", env=env)
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    lines = loud.stderr.splitlines()
    assert any(" INFO dialogue.kernel" in ln and "started" in ln for ln in lines), loud.stderr
    assert any(" INFO dialogue.runs" in ln and "ended: ok" in ln for ln in lines), loud.stderr
    assert not any(" DEBUG " in ln for ln in lines)
    debug = run("--log-level", "debug", "exec", "v", "1", env=env)
    assert any(" DEBUG dialogue." in ln for ln in debug.stderr.splitlines()), debug.stderr
    # from the config file, and the command line beats it
    Path(env["DIALOGUE_CONFIG"]).write_text('log_level = "info"\n')
    assert " INFO dialogue." in run("exec", "v", "1", env=env).stderr
    assert run("exec", "v", "1", "--log-level", "error", env=env).stderr == ""
