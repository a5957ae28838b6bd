"""The local model in a process of its own: what a native crash does (one answer fails with a clear
error, the app, its kernels and the store live on, the next prompt starts a fresh process), how
models load on every CPU (no extra weight buffers: the path that crashed on AMX Xeons), and the
process's plumbing (cancel, progress, the cache directory the app sets)."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dialogue.llm.base import Progress, Request, TextDelta, Turn, Usage, get_provider
from dialogue.gguf.models import ModelSpec, bundled_model_path, resolve
from dialogue.local.process import ModelCrashedError, ModelProcess, get_model_process
from dialogue.local.runtime import OFF, quantize
from dialogue.service import DialogueService

SYSTEM = "You are a helpful assistant. Answer briefly."


def _gone(pid: int, timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def hooked(tmp_path, monkeypatch):
    """A model process with the test hooks on (their own process: the shared one has them off)."""
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    mp = ModelProcess(resolve("default"), env={**os.environ, "DIALOGUE_TEST_HOOKS": "1"})
    yield mp
    mp.close()


def _prompt(mp: ModelProcess, q: str = "Tell me a long story about a lighthouse keeper."):
    return mp.build_prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])


# ---------------------------------------------------------------- crashes stay in their process

@pytest.mark.parametrize("how,sig", [("segv", signal.SIGSEGV), ("abort", signal.SIGABRT)])
async def test_a_native_crash_fails_the_answer_and_the_next_call_starts_a_fresh_process(hooked, how, sig):
    mp = hooked
    mp.start()
    pid = mp.pid
    got: list[str] = []
    with pytest.raises(ModelCrashedError) as e:
        async for item in mp.stream(_prompt(mp), max_tokens=200, sampling=OFF):
            if isinstance(item, str):
                got.append(item)
                if len(got) == 2:
                    mp.crash(how)  # dies natively inside the worker, mid-answer
    msg = str(e.value)
    assert f"signal {int(sig)}" in msg and sig.name in msg and "restarts on the next prompt" in msg
    assert len(got) >= 2 and _gone(pid)
    # this process (the "app") is alive and the next call simply works, in a new process
    stats = await asyncio.to_thread(mp.generate, _prompt(mp, "What is 2+2?"), max_tokens=8, sampling=OFF)
    assert stats.generated > 0 and mp.pid not in (None, pid) and mp.starts == 2 and mp.crashes == 1


def test_test_hooks_are_off_unless_the_app_turns_them_on(tmp_path, monkeypatch):
    monkeypatch.delenv("DIALOGUE_TEST_HOOKS", raising=False)
    mp = ModelProcess(resolve("default"))
    try:
        mp.start()
        pid = mp.pid
        mp.crash("segv")
        assert mp.count_tokens("still here") > 0 and mp.pid == pid  # refused, not crashed
    finally:
        mp.close()


async def test_kill_9_of_the_model_process_mid_answer_keeps_the_service_its_kernel_and_the_store(tmp_path, monkeypatch):
    """The OOM killer's view: SIGKILL while an answer streams. The answer keeps what streamed and
    says what happened; a code cell's kernel and the store are untouched; the next prompt of the
    same dialogue is answered by a fresh process."""
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    svc = DialogueService(tmp_path / "d.db")
    mp = get_model_process("default")
    try:
        d = svc.create("crash", model="local:default", meta={"sampling": {"loop_stop": False}})
        code = svc.add(d.id, "code", "x = 41")
        await svc.run(d.id, code.id)
        kernel_pid = (await svc.kernel(d.id)).pid
        p = svc.add(d.id, "prompt", "Tell me a long story about a lighthouse keeper and the sea.")
        svc.start(d.id, p.id)
        pieces = 0
        async for ev in svc.subscribe(p.id):
            if ev.type == "text":
                pieces += 1
                if pieces == 3:
                    mp.kill(signal.SIGKILL)
            if ev.type == "done":
                break
        m = svc.message(d.id, p.id)
        assert "crashed (SIGKILL, signal 9)" in m.meta["error"] and "restarts on the next prompt" in m.meta["error"]
        assert m.response.strip() and svc.run_status(m) == "error"
        # the kernel lived through it, with its state
        again = svc.add(d.id, "code", "x + 1")
        out = await svc.run(d.id, again.id)
        assert (await svc.kernel(d.id)).pid == kernel_pid
        assert out.outputs[0]["data"]["text/plain"] == "42"
        # and the next prompt is answered
        starts = mp.starts
        q = svc.add(d.id, "prompt", "What is 2+2?")
        a = await svc.run(d.id, q.id)
        assert not a.meta.get("error") and a.response.strip() and mp.starts == starts + 1
    finally:
        await svc.aclose()


def test_the_cli_prints_one_line_and_exits_1_when_the_model_process_crashes(tmp_path):
    """`dialogue ask` with a crash planned by the worker's test hook: one line on stderr, exit 1,
    the answer stored with the error; the next `ask` answers."""
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path), "DIALOGUE_DB": str(tmp_path / "d.db"),
           "DIALOGUE_CACHE_DIR": str(tmp_path / "kv"), "DIALOGUE_TEST_HOOKS": "1",
           "DIALOGUE_TEST_CRASH_FILE": str(tmp_path / "crash")}
    cli = [str(Path(sys.executable).parent / "dialogue")]  # the installed console script
    subprocess.run([*cli, "new", "c"], env=env, check=True, capture_output=True, timeout=120)
    (tmp_path / "crash").write_text("2 segv")
    r = subprocess.run([*cli, "ask", "c", "Tell me a story about the sea."], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "reading the prompt" not in ln]
    assert len(lines) == 1 and re.search(r"crashed \(SIGSEGV, signal 11\).*restarts on the next prompt", lines[0])
    assert "Traceback" not in r.stderr and not (tmp_path / "crash").exists()
    r = subprocess.run([*cli, "ask", "c", "What is 2+2?"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_the_model_process_ends_with_the_app(tmp_path):
    """kill -9 of the app: the model process sees its request pipe close and exits."""
    script = ("import sys; from dialogue.local.process import get_model_process\n"
              "mp = get_model_process('default'); mp.start(); print(mp.pid, flush=True); sys.stdin.read()\n")
    app = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "DIALOGUE_HOME": str(tmp_path)})
    try:
        pid = int(app.stdout.readline())
        os.kill(pid, 0)
        app.kill()
        app.wait(timeout=30)
        assert _gone(pid), "the model process outlived the app"
    finally:
        app.kill()


# ---------------------------------------------------------------- plumbing

async def test_progress_while_a_long_prompt_is_read_then_text(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    prov = get_provider("local:default")
    prov.runtime.reset()
    doc = "The lighthouse stands on the rock. " * 120  # ~1,000 tokens: several 128-token chunks
    req = Request(model="local:default", system=SYSTEM, max_tokens=4, meta={"kv_cache": False},
                  messages=[Turn("user", doc + "\nWhere does the lighthouse stand?")])
    events = [e async for e in prov.stream(req)]
    prog = [e for e in events if isinstance(e, Progress)]
    first_text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    assert len(prog) >= 5 and all(events.index(p) < first_text for p in prog)
    assert [p.read for p in prog] == sorted(p.read for p in prog) and prog[-1].read < prog[-1].total
    assert prog[0].eta_s is None and all(p.eta_s is not None and p.eta_s >= 0 for p in prog[1:])
    total = prog[0].total
    u = next(e for e in events if isinstance(e, Usage))
    assert total == u.input + u.cache_read + u.cache_write


async def test_closing_the_stream_cancels_within_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    mp = get_model_process("default")
    mp.reset()
    p = _prompt(mp)
    n = 0
    agen = mp.stream(p, max_tokens=400, sampling=OFF, use_cache=False)
    async for item in agen:
        if isinstance(item, str):
            n += 1
            if n == 3:
                break
    await agen.aclose()
    # the process has let go of the model: what it evaluated is the prompt and a few tokens
    assert mp.evaluated() - len(p) < 20


def test_the_kv_cache_directory_is_the_apps_setting_at_each_call(tmp_path, monkeypatch):
    mp = get_model_process("default")
    msgs = [{"role": "system", "content": SYSTEM + " " + "Be precise. " * 40},
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you?"}]
    p = mp.build_prompt(msgs)
    for sub in ("a", "b"):
        monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / sub))
        mp.reset()
        mp.generate(p, max_tokens=1, sampling=OFF)
        assert any((tmp_path / sub).rglob("*.state")) or any(p.is_file() for p in (tmp_path / sub).rglob("*"))


def test_a_model_that_fails_to_load_is_a_clear_error_not_a_crash(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    mp = ModelProcess(ModelSpec("bad", bad, "path"))
    try:
        from dialogue.llm.base import ProviderError
        with pytest.raises(ProviderError, match="could not load the model"):
            mp.start()
    finally:
        mp.close()


# ---------------------------------------------------------------- loading on every CPU

LOAD_SCRIPT = """
import sys
from pathlib import Path
from dialogue.gguf.models import ModelSpec
from dialogue.local.runtime import OFF, Runtime
rt = Runtime(ModelSpec("m", Path(sys.argv[1]), "path"), verbose=True)
p = rt.build_prompt([{"role": "user", "content": "hi"}])
st = rt.generate(p, max_tokens=2, sampling=OFF, use_cache=False)
print("EXTRA", rt.llm.model_params.use_extra_bufts, "GEN", st.generated, flush=True)
"""


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory) -> Path:
    """A Q4_0 copy of the bundled model: the type llama.cpp repacks on AVX2 and ARM CPUs."""
    return quantize(bundled_model_path(), tmp_path_factory.mktemp("q4_0") / "smollm2-q4_0.gguf", "q4_0")


def _load_log(model: Path, **env: str) -> tuple[str, list[str]]:
    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(model)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    buffers = re.findall(r"load_tensors:\s+(\S+) model buffer size", r.stderr)
    return r.stdout, buffers


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.parametrize("model", ["bundled", "q4_0"])
def test_models_load_into_plain_cpu_buffers_whatever_the_cpu(model, q4_0):
    """No AMX and no CPU_REPACK buffers, whatever the CPU offers: the model's weights are read from
    the mapped file as they are (on an AMX Xeon the AMX buffers crashed the first decode)."""
    path = bundled_model_path() if model == "bundled" else q4_0
    # on the CPU path (a GPU build would put the layers in device buffers, which is not in question)
    out, buffers = _load_log(path, DIALOGUE_LLAMA_REPACK="", DIALOGUE_GPU_LAYERS="0")
    assert "EXTRA False" in out and "GEN" in out
    assert buffers and set(buffers) <= {"CPU", "CPU_Mapped"}, buffers


def test_the_repack_opt_in_really_changes_the_buffers(q4_0):
    """The check above can fail: with DIALOGUE_LLAMA_REPACK=1 the same Q4_0 model goes into
    repacked buffers on a CPU with AVX2 (the x86 repack kernels need it)."""
    if not ({"avx2"} & _cpu_flags()):
        pytest.skip("llama.cpp repacks Q4_0 only on AVX2 (x86) or NEON (ARM); this CPU has no AVX2")
    out, buffers = _load_log(q4_0, DIALOGUE_LLAMA_REPACK="1", DIALOGUE_GPU_LAYERS="0")
    assert "EXTRA True" in out
    assert any(b not in ("CPU", "CPU_Mapped") for b in buffers), buffers  # CPU_REPACK (or AMX)


def test_the_model_process_loads_the_safe_way(tmp_path):
    mp = get_model_process("default")
    info = mp.status()
    assert info["extra_bufts"] is False and info["pid"] == mp.pid != os.getpid()


# ---------------------------------------------------------------- where models run

def test_gpu_layers_default_to_all_on_a_gpu_build_and_none_on_a_cpu_build(monkeypatch):
    from dialogue.llm.base import ProviderError
    from dialogue.local import runtime as R
    monkeypatch.delenv("DIALOGUE_GPU_LAYERS", raising=False)
    monkeypatch.setattr(R, "gpu_offload", lambda: False)
    assert R.gpu_layers() == 0 and R.device_text() == "CPU"
    monkeypatch.setattr(R, "gpu_offload", lambda: True)
    assert R.gpu_layers() == -1 and R.device_text() == "GPU (all layers)"
    monkeypatch.setenv("DIALOGUE_GPU_LAYERS", "12")
    assert R.gpu_layers() == 12 and R.device_text() == "GPU (12 layers), CPU (the rest)"
    monkeypatch.setenv("DIALOGUE_GPU_LAYERS", "0")
    assert R.device_text() == "CPU"
    monkeypatch.setenv("DIALOGUE_GPU_LAYERS", "all")
    with pytest.raises(ProviderError, match="DIALOGUE_GPU_LAYERS must be an integer"):
        R.gpu_layers()


def test_dialogue_models_says_where_each_model_runs(tmp_path):
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path), "COLUMNS": "250"}
    env.pop("DIALOGUE_GPU_LAYERS", None)
    r = subprocess.run([str(Path(sys.executable).parent / "dialogue"), "models"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from dialogue.local.runtime import gpu_offload
    want = "GPU (all layers)" if gpu_offload() else "CPU"
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip().startswith(("local:", "claude", "gpt"))}
    assert "runs on" in r.stdout and want in rows["local:default"]
    assert any("remote API" in ln for k, ln in rows.items() if not k.startswith("local:"))


# ---------------------------------------------------------------- a dialogue's generation settings

async def test_a_dialogues_sampling_and_max_tokens_reach_the_local_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path))
    monkeypatch.setenv("DIALOGUE_CACHE_DIR", str(tmp_path / "kv"))
    svc = DialogueService(tmp_path / "d.db")
    try:
        d = svc.create("loops", model="local:default")
        ask = "Write the text '({})' one hundred times."
        m = svc.add(d.id, "prompt", ask)
        a = await svc.run(d.id, m.id, prefill="({}) ({}) ({}) ({}) ({})")
        assert a.usage["stop_reason"] == "end"               # the defaults: DRY keeps it out of the loop
        svc.update(d.id, sampling={"dry_multiplier": 0})
        a = await svc.run(d.id, m.id, prefill="({}) ({}) ({}) ({}) ({})")
        assert a.usage["stop_reason"] == "repetition"        # the loop stop still ends it
        svc.update(d.id, sampling={"loop_stop": False}, max_tokens=30)
        a = await svc.run(d.id, m.id, prefill="({}) ({}) ({}) ({}) ({})")
        assert a.usage["stop_reason"] == "max_tokens" and a.usage["output"] == 30
        assert svc.open(d.id).meta["sampling"] == {"dry_multiplier": 0.0, "loop_stop": False}
        svc.update(d.id, sampling=None, max_tokens=None)
        assert "sampling" not in svc.open(d.id).meta and "max_tokens" not in svc.open(d.id).meta
        v = svc.open(d.id).version
        for bad in ({"sampling": {"nope": 1}}, {"max_tokens": 0}, {"max_tokens": "many"},
                    {"meta": {"sampling": {"dry_base": 0.5}}}):
            with pytest.raises(ValueError):
                svc.update(d.id, **bad)
        assert svc.open(d.id).version == v  # nothing was stored
    finally:
        await svc.aclose()


def test_dialogue_config_shows_and_changes_the_settings(tmp_path):
    env = {**os.environ, "DIALOGUE_HOME": str(tmp_path), "DIALOGUE_DB": str(tmp_path / "d.db")}
    cli = [str(Path(sys.executable).parent / "dialogue")]
    run = lambda *a: subprocess.run([*cli, *a], env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("new", "c").returncode == 0
    r = run("config", "c", "--max-tokens", "64", "--sampling", "dry_multiplier=0", "--sampling",
            "loop_stop=off", "--output-limit", "5,5,500")
    assert r.returncode == 0, r.stderr
    assert re.search(r"max tokens\s+64", r.stdout) and "dry_multiplier=0.0, loop_stop=False" in r.stdout
    assert re.search(r"output limit\s+5,5,500", r.stdout)
    r = run("config", "c", "--sampling", "nope=1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown sampling setting" in r.stderr
    r = run("config", "c", "--sampling-defaults", "--max-tokens", "default")
    assert r.returncode == 0 and "sampling      defaults" in r.stdout and "the model's default" in r.stdout


def test_restarting_again_and_again_never_mixes_up_processes(tmp_path, monkeypatch):
    """Each process has its own pipes and waiting calls: ending one and starting the next in a
    loop (pipe descriptors get reused) never fails or answers a call of the new one with an event
    of the old one."""
    mp = ModelProcess(resolve("default"), env={**os.environ, "DIALOGUE_TEST_HOOKS": "1"})
    try:
        for i in range(6):
            assert mp.count_tokens(f"round {i}") > 0
            if i % 2:
                mp.close()
            else:
                pid = mp.pid
                mp.kill()
                assert _gone(pid)  # (a call racing the kill would fail: it was made to that process)
        assert mp.count_tokens("last") > 0 and mp.starts == 7
    finally:
        mp.close()
