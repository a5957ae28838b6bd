"""Providers are imported per name prefix: a local prompt never imports a hosted SDK (importing
`anthropic` and `openai` took 1.3 s), and a Claude prompt does not import `openai`. Checked in a
fresh interpreter, where `sys.modules` shows exactly what the work imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dialogue.llm import base

SDKS = ("anthropic", "openai")


def loaded_after(code: str, tmp_path, timeout: int = 300) -> list[str]:
    """Run `code` in a fresh interpreter; the SDKs it left in sys.modules."""
    tail = f"\nimport sys, json\nprint('SDKS=' + json.dumps([m for m in {SDKS!r} if m in sys.modules]))\n"
    env = {**os.environ, "DIALOGUE_DB": str(tmp_path / "lazy.db"), "DIALOGUE_HOME": str(tmp_path / "home"),
           "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code + tail], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("SDKS=")][-1]
    return json.loads(line.removeprefix("SDKS="))


@pytest.mark.slow
def test_a_local_prompt_from_the_cli_imports_no_hosted_sdk(tmp_path):
    """`dialogue new` + `dialogue ask` on the bundled model, run in-process: the answer comes, and
    neither SDK was imported on the way."""
    code = """
from dialogue.cli.main import main
for args in (["new", "q", "--model", "local:default"], ["ask", "q", "What is 2 + 2? Answer with a number."]):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    assert not rc, (args, rc)
from dialogue.service import DialogueService
svc = DialogueService()
m = svc.open("q").messages[-1]
assert m.response.strip() and m.usage["output"] > 0 and m.usage["cost"] == 0.0, m
svc.close()
"""
    assert loaded_after(code, tmp_path) == []


def test_resolving_a_name_imports_only_its_adapter(tmp_path):
    code = """
from dialogue.llm import check_model, cost, get_provider, Usage
check_model("local:default")
assert cost("local:default", Usage(5, 5)) == 0.0
assert get_provider("local:default").name
"""
    assert loaded_after(code, tmp_path) == []
    assert loaded_after('from dialogue.llm import get_provider\nget_provider("claude-sonnet-4-5")', tmp_path) \
        == ["anthropic"]
    assert loaded_after('from dialogue.llm import get_provider\nget_provider("o3-mini")', tmp_path) == ["openai"]
    # listing every model (`dialogue models`, the web's picker) needs no SDK either
    listing = """
from dialogue.llm import list_models
names = [m.name for m in list_models()]
assert names[0].startswith("local:") and "claude-sonnet-4-5" in names and "gpt-5" in names, names
"""
    assert loaded_after(listing, tmp_path) == []
    # nor does pricing a hosted answer
    assert loaded_after('from dialogue.llm import cost, Usage\nassert cost("gpt-5", Usage(9, 9)) > 0', tmp_path) == []


def test_the_lazy_table_names_exactly_what_each_adapter_registers():
    """BUILTIN_PREFIXES says which module serves a prefix; the module's own register() calls must
    say the same, or a name would load the wrong adapter (or none)."""
    base._load_builtin()
    registered = {p: getattr(f, "__module__", "") for p, f in base._REGISTRY}
    for prefix, module in base.BUILTIN_PREFIXES.items():
        assert registered.get(prefix) == f"dialogue.llm.{module}", prefix
    builtin = {p for p, m in registered.items() if m.startswith("dialogue.llm.")}
    assert builtin == set(base.BUILTIN_PREFIXES)


def test_threads_resolving_a_model_while_its_sdk_imports_all_get_it(tmp_path):
    """The web app resolves models in worker threads: the second thread to ask for a Claude
    model while the first is still importing the SDK waits for it (it was refused as an unknown
    model, the module marked tried but not yet registered)."""
    code = """
import threading
from dialogue.llm import base
errors = []
def go():
    try:
        base.get_provider("claude-sonnet-4-5")
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=go) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert errors == [], errors
"""
    assert loaded_after(code, tmp_path) == ["anthropic"]
