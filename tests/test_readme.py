"""The README's examples run as written: every `dialogue ...` command of its shell blocks and its
Python blocks, in order, against a temporary database, home and cache, with the bundled local model
answering and a real kernel running the code.

What an example needs that is the reader's own (a notebook.ipynb, a GGUF in ~/models, a kernelspec
named myproject, a project's Python, the adapter `dialogue train` would have made) is put in place
first, the way a reader would have it. A command this test cannot run is listed in SKIP with the
reason; any other command must run and exit 0, so a README example that stops working, or a new one
nobody ran, fails here.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# command prefix -> why it is not run here
SKIP = {
    "make": "builds the environment these tests run in",
    "dialogue train": "needs the [train] extra and minutes of CPU (tests/train runs the trainer); "
                      "its adapter.gguf is put in place instead",
    "CMAKE_ARGS=": "rebuilds llama-cpp-python for a GPU",
    "jupyter kernelgateway": "starts a server on another machine (tests/test_remote_kernel.py "
                             "starts a real one on 127.0.0.1)",
    "llama-server ": "starts llama.cpp's server (tests/test_llama_server.py starts a real one)",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=": "starts vLLM, which needs a GPU (tests/test_engines.py "
                                         "checks the protocol against a local server)",
    "DIALOGUE_VLLM_MAX_LORA_RANK=": "names a vLLM server on another machine",
    "DIALOGUE_GATEWAY_URL=": "needs that gateway; tests/test_remote_kernel.py runs these commands "
                             "against a real one",
}

pytestmark = pytest.mark.slow


def fenced(lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [m.group(2) for m in re.finditer(r"^ *```(\w+)\n(.*?)^ *```", text, re.S | re.M)
            if m.group(1) == lang]


def commands(block: str, home: Path) -> list[list[str]]:
    """Each command of a shell block: comments dropped, `;` separating commands, `~` expanded
    to `home` as the shell would."""
    out: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
        argv: list[str] = []
        for tok in shlex.split(line, comments=True) + [";"]:
            if tok == ";":
                if argv:
                    out.append(argv)
                argv = []
            else:
                argv.append(str(home / tok[2:]) if tok.startswith("~/") else tok)
    return out


def skipped(argv: list[str]) -> str | None:
    line = " ".join(argv)
    return next((why for prefix, why in SKIP.items() if line.startswith(prefix)), None)


@pytest.fixture
def world(tmp_path: Path) -> dict[str, str]:
    """The reader's machine: a home, a database, a cache, and the files the examples name."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    from dialogue.gguf.models import resolve
    (home / "models" / "qwen.gguf").symlink_to(resolve("local:default").path)
    # a project's environment with ipykernel (this one) and a kernelspec named myproject
    (home / "proj").mkdir()
    (home / "proj" / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    spec = tmp_path / "jupyter" / "kernels" / "myproject"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "My project", "language": "python"}))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook"),
                nbformat.v4.new_code_cell("x = 6 * 7\nprint(x)")]
    nbformat.write(nb, tmp_path / "notebook.ipynb")
    env = {**os.environ, "HOME": str(home), "DIALOGUE_DB": str(tmp_path / "dialogue.db"),
           "DIALOGUE_HOME": str(tmp_path / "dialogue-home"),
           "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    for k in ("DIALOGUE_MODEL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "DIALOGUE_CONFIG"):
        env.pop(k, None)
    return {"cwd": str(tmp_path), "home": str(home), **{f"env:{k}": v for k, v in env.items()}}


def _env(world: dict[str, str]) -> dict[str, str]:
    return {k[4:]: v for k, v in world.items() if k.startswith("env:")}


def dialogue(world: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], cwd=world["cwd"],
                          env=_env(world), capture_output=True, text=True, timeout=300)


def prepare_adapters(world: dict[str, str]) -> None:
    """What the models block takes as given: a dialogue `mywork`, a registered adapter `other`,
    and the adapter `dialogue train` writes to runs/mine/adapter.gguf."""
    sys.path.insert(0, str(Path(__file__).parent))
    from loras import strong_lora
    runs = Path(world["cwd"]) / "runs" / "mine"
    runs.mkdir(parents=True)
    strong_lora(runs / "adapter.gguf", seed=1)
    strong_lora(Path(world["cwd"]) / "other.gguf", seed=2)
    assert dialogue(world, "new", "mywork").returncode == 0
    r = dialogue(world, "adapters", "add", "other.gguf", "--name", "other")
    assert r.returncode == 0, r.stderr


def test_the_readme_shell_examples_run_as_written(world):
    home = Path(world["home"])
    ran, skips = [], []
    blocks = fenced("sh")
    assert len(blocks) >= 3  # quick start, the command line, models and adapters (at least)
    prepared = False
    for block in blocks:
        cmds = commands(block, home)
        if not prepared and any(c[:2] == ["dialogue", "adapters"] for c in cmds):
            prepare_adapters(world)
            prepared = True
        for argv in cmds:
            if (why := skipped(argv)) is not None:
                skips.append((argv, why))
                continue
            assert argv[0] == "dialogue", f"a README command this test cannot run: {argv}"
            r = dialogue(world, *argv[1:])
            assert r.returncode == 0, f"{shlex.join(argv)} failed:\n{r.stdout}\n{r.stderr}"
            ran.append((argv, r))
    said = {shlex.join(a): r for a, r in ran}
    # a few checks that the commands did what the README says they do
    assert "math.pi" in said["dialogue show scratch"].stdout
    assert "restored from the trash, at position 2" in said["dialogue restore scratch 2"].stdout
    assert said["dialogue export scratch --to md -o -"].stdout.startswith("# ")
    assert "step 1" in said["dialogue history scratch 1"].stdout
    assert (Path(world["cwd"]) / "executed.ipynb").exists()
    assert "local:default" in said["dialogue models"].stdout
    assert "added local:qwen" in next(r for a, r in ran if a[:3] == ["dialogue", "models", "add"]).stdout
    assert len(ran) >= 25 and all(why for _, why in skips)


def test_the_readme_python_examples_run_as_written(world):
    blocks = fenced("python")
    assert blocks
    for code in blocks:
        # the README's expression lines show values in Jupyter; a script runs them the same way
        r = subprocess.run([sys.executable, "-c", code + "\nprint()\nprint(repr(d))"],
                           cwd=world["cwd"], env=_env(world), capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "Dialogue('scratch', 6 messages)"
