"""The package as packagers see it: every distribution `src` imports is declared where it is
imported (core, or the extra of the part that imports it), the train extra holds ranges (exact pins
live in constraints.txt), one source for the version, py.typed shipped, a clear error where the
`hub` extra is missing. The wheel itself is installed into a fresh virtualenv in
tests/test_fresh_install.py."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions, version
from pathlib import Path

import dialogue

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dialogue"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# imported only inside a guard that says what to install, and declared in that extra
GUARDED = {"huggingface_hub": "hub", "safetensors": "train", "websockets": "remote"}
# imported inside a guard, from no extra of ours: Liger's CUDA kernel (train/loop.py uses it when
# present), httpx2 (the SDKs' transport, which comes with them: llm/hosted.py)
UNDECLARED_OK = {"liger_kernel", "httpx2"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(reqs: list[str]) -> set[str]:
    return {norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the parts of src/dialogue that import it ("train" or "core")."""
    found: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        part = "train" if f.relative_to(SRC).parts[0] == "train" else "core"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("dialogue", "_dialogue_kernel"):
                    found.setdefault(top, set()).add(part)
    return found


def test_every_imported_distribution_is_declared_where_it_is_imported():
    core = names(PROJECT["dependencies"])
    extras = {k: names(v) for k, v in PROJECT["optional-dependencies"].items()}
    dists = packages_distributions()
    missing = []
    for mod, parts in sorted(third_party_imports().items()):
        if mod in UNDECLARED_OK:
            continue
        assert mod in dists, f"{mod} is imported by src but not installed here"
        dist = norm(dists[mod][0])
        if mod in GUARDED:
            if dist not in extras[GUARDED[mod]]:
                missing.append(f"{dist} (extra {GUARDED[mod]})")
            continue
        if "core" in parts and dist not in core:
            missing.append(f"{dist} (dependencies)")
        if parts == {"train"} and dist not in core | extras["train"]:
            missing.append(f"{dist} (extra train)")
    assert not missing, f"imported but not declared: {missing}"


def test_no_declared_dependency_that_nothing_imports():
    """httpx was declared and never imported (the SDKs bring httpx2 themselves)."""
    assert "httpx" not in names(PROJECT["dependencies"])
    assert "httpx" not in third_party_imports()


def test_the_train_extra_holds_ranges_and_constraints_the_pins():
    pins = {norm(line.split("==")[0]): line.split("==")[1].strip()
            for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.lstrip().startswith("#")}
    for req in PROJECT["optional-dependencies"]["train"]:
        assert "==" not in req, f"{req}: an exact pin in the extra replaces a user's own build"
        assert norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)) in pins, f"{req} has no pin in constraints.txt"
    transformers = next(r for r in PROJECT["optional-dependencies"]["train"] if r.startswith("transformers"))
    assert "<" in transformers  # we read one of its private tables: one major at a time
    for dist, pinned in pins.items():  # the pins are what this environment runs
        gpu_only = {norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0))
                    for r in PROJECT["optional-dependencies"].get("gpu", [])}
        if dist in gpu_only:  # the gpu extra (Liger) installs only where CUDA is
            continue
        if dist not in ("torch",):  # torch's local build tag (+cpu) is not part of the pin
            assert version(dist) == pinned, dist


def test_one_version_and_py_typed():
    assert "version" in PROJECT and dialogue.__version__ == PROJECT["version"] == version("dialogue")
    assert (SRC / "py.typed").is_file()
    classifiers = PROJECT["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert {c for c in classifiers if c.startswith("Programming Language :: Python :: 3.")} \
        >= {f"Programming Language :: Python :: 3.{v}" for v in (11, 12, 13)}


def test_without_the_hub_extra_adding_from_the_hub_says_what_to_install(tmp_path):
    code = """
import sys
sys.modules["huggingface_hub"] = None  # as if not installed
from dialogue.errors import ProviderError
from dialogue.gguf import models
from dialogue.local import adapters
for call in (lambda: models.add_from_hub("owner/repo", "model.gguf"),
             lambda: adapters.add("owner/some-adapter")):
    try:
        call()
    except Exception as e:
        print(type(e).__name__, e)
    else:
        raise SystemExit("no error")
"""
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith("UnknownModelError") and lines[1].startswith("AdapterError")
    assert all("pip install 'dialogue[hub]'" in ln for ln in lines)
