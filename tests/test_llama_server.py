"""A dialogue's adapter set on a real llama.cpp `llama-server` (llm/engines.py), built once from
the sources the llama-cpp-python sdist vendors (scripts/build-llama-server; `make test` builds it
before the tests, kept outside the clone) and started here on the bundled model with two LoRA
files. Skipped only where there is no compiler to build it with."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from dialogue.gguf.models import resolve
from dialogue.llm.base import TextDelta
from dialogue.local import adapters as A
from dialogue.service import DialogueService
from loras import strong_lora

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def llama_server_bin() -> str:
    given = os.environ.get("DIALOGUE_LLAMA_SERVER")
    if given:
        return given
    import sys
    if not (shutil.which("cmake") and shutil.which("c++")):
        pytest.skip("llama-server cannot be built here: no cmake or C++ compiler on PATH")
    r = subprocess.run([str(ROOT / "scripts" / "build-llama-server"), sys.executable],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode == 3:
        pytest.skip(f"llama-server cannot be built here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(binary: str, loras: list[Path]) -> Iterator[str]:
    port = _port()
    cmd = [binary, "-m", str(resolve("local:default").path), "--host", "127.0.0.1", "--port", str(port),
           "-c", "2048", "-t", "2", "-np", "1", "--no-webui", "--lora-init-without-apply"]
    for p in loras:
        cmd += ["--lora", str(p)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llama-server exited: {proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy in 120 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    return tmp_path


async def test_the_set_goes_with_each_request_and_a_missing_adapter_is_named(llama_server_bin, home):
    sharp = Path(A.add(strong_lora(home / "sharp.gguf", 1), "sharp").path)
    soft = Path(A.add(strong_lora(home / "soft.gguf", 2), "soft").path)
    other = Path(A.add(strong_lora(home / "other.gguf", 3), "other").path)  # not on the server
    svc = DialogueService(home / "d.db")
    try:
        with serving(llama_server_bin, [sharp, soft]) as url:
            svc.create("d", model=f"llama-server:{url}")
            svc.update("d", meta={"max_tokens": 12})

            async def ask(adapters) -> str:  # one prompt, answered under `adapters`, stored nowhere
                out = []
                async for ev in svc.trial("d", "What is the capital of France?", adapters=adapters):
                    if isinstance(ev, TextDelta):
                        out.append(ev.text)
                return "".join(out)

            # Each request below changes the set, so the server clears its prompt cache and reads
            # the whole prompt each time: like for like (a cached prefix may round differently,
            # and these random adapters make greedy decoding chaotic).
            plain = await ask(None)
            assert plain
            with_sharp = await ask({"sharp": 1.0})
            assert with_sharp != plain  # the adapter was applied
            # no set: every adapter at scale 0, not the previous request's scales left on the server
            assert await ask(None) == plain
            assert await ask({"sharp": 1.0, "soft": 0.0}) == with_sharp  # listed but off: the same
            assert await ask({"soft": 1.0}) not in (plain, with_sharp)
            # the dialogue's own set, through a stored answer
            svc.set_adapters("d", {"sharp": 1.0})
            m = await svc.run("d", svc.add("d", "prompt", "What is the capital of France?").id)
            assert m.response == with_sharp and m.meta["provenance"]["adapters"]["set"] == {"sharp": 1.0}
            svc.set_adapters("d", {"other": 1.0})
            m = await svc.run("d", svc.add("d", "prompt", "Hi").id)
            err = m.meta["error"]
            assert f"does not hold the adapter {other.name}" in err
            assert f"{sharp.name}, {soft.name}" in err
            assert "--lora" in err
    finally:
        await svc.aclose()
