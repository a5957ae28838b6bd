"""Kernels on a gateway: a real Jupyter Kernel Gateway (`jupyter_kernel_gateway`, the REST and
websocket kernel API of jupyter_server) started on 127.0.0.1 with a token, and RemoteKernel
driving its kernels as a dialogue's."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import pytest_asyncio

import gateways
from gateways import TOKEN, free_port

from dialogue.kernel.remote import Gateway, GatewayError, RemoteKernel
from dialogue.kernel.specs import Choice

pytest.importorskip("kernel_gateway", reason="the [test] extra's jupyter_kernel_gateway")
pytestmark = pytest.mark.asyncio(loop_scope="module")



@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A Kernel Gateway subprocess: (Gateway with the right token, the process)."""
    url, p = gateways.start(tmp_path_factory.mktemp("gw"))
    yield Gateway(url, TOKEN), p
    gateways.stop(p)


def _remote_kernels(gw: Gateway) -> list[dict]:
    return gateways.kernels(gw.url)


@pytest_asyncio.fixture(loop_scope="module")
async def rk(gateway, tmp_path):
    gw, _ = gateway
    k = RemoteKernel(gateway=gw, choice=Choice(gateway="python3"), cwd=tmp_path,
                     output_cap=2_000, interrupt_grace=5.0)
    yield k
    await k.shutdown()


async def test_gateway_lists_its_kernelspecs(gateway):
    gw, _ = gateway
    specs = await asyncio.to_thread(gw.specs)
    assert "python3" in specs and specs["python3"]["language"] == "python"
    with pytest.raises(GatewayError, match="has no kernel named 'nope'.*python3"):
        await asyncio.to_thread(gw.check_spec, "nope")


async def test_wrong_token_is_a_clear_error(gateway, tmp_path):
    gw, _ = gateway
    bad = Gateway(gw.url, "wrong")
    with pytest.raises(GatewayError, match=r"refused .*HTTP 40[13].*gateway_token"):
        await asyncio.to_thread(bad.specs)
    k = RemoteKernel(gateway=bad, choice=Choice(gateway="python3"), cwd=tmp_path)
    res = await k.run("1")
    assert res.status == "died" and "gateway_token" in res.message
    assert not k.is_alive


async def test_unreachable_gateway_is_a_clear_error(tmp_path):
    gw = Gateway(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=5)
    with pytest.raises(GatewayError, match="cannot reach the kernel gateway"):
        await asyncio.to_thread(gw.specs)


async def test_runs_stream_error_and_cap(rk, gateway):
    gw, _ = gateway
    ex = rk.execute("import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.3)\n"
                    "x = 41\nx + 1")
    seen = []
    async for out in ex:
        seen.append((round(time.monotonic(), 1), out))
    res = await ex
    assert res.ok, res.message
    streams = [o for _, o in seen if o["output_type"] == "stream"]
    assert len(streams) >= 3  # streamed as printed, not at the end
    assert seen[-1][0] - seen[0][0] >= 0.5
    assert res.outputs[0]["text"] == "0\n1\n2\n"
    assert res.outputs[-1]["data"]["text/plain"] == "42"
    assert rk.containment == "remote" and rk.pid is None and rk.kernel_id
    assert any(k["id"] == rk.kernel_id for k in _remote_kernels(gw))
    # the variables live in the remote kernel; the helpers work there ($`expr`, !`cmd`)
    assert await rk.eval("x") == "41"
    assert "hello" in await rk.shell("echo hello")
    err = await rk.run("1/0")
    assert err.status == "error" and "ZeroDivisionError" in err.message
    assert any(o["output_type"] == "error" for o in err.outputs)
    big = await rk.run("print('y' * 10_000)")
    assert big.truncated > 0 and sum(len(o.get("text", "")) for o in big.outputs) < 3_000
    # clear_output folds as in a local kernel
    cl = await rk.run("from IPython.display import clear_output\nprint('a')\n"
                      "clear_output()\nprint('b')")
    assert [o.get("text") for o in cl.outputs] == ["b\n"]


async def test_input_interrupt_restart(rk):
    ex = rk.execute("name = input('who? ')\nprint('hi', name)", allow_stdin=True)
    async for out in ex:
        if out["output_type"] == "input_request":
            assert out["prompt"] == "who? "
            ex.reply("ada")
    res = await ex
    assert res.ok, res.message
    assert "".join(o.get("text", "") for o in res.outputs) == "who? ada\nhi ada\n"

    await rk.run("kept = 7")
    ex = rk.execute("import time\nfor i in range(600):\n    time.sleep(0.1)")
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    await rk.interrupt()
    res = await ex
    assert res.status == "interrupted" and time.monotonic() - t0 < 10
    assert await rk.eval("kept") == "7"  # the same kernel, its variables kept
    # a timeout interrupts too
    res = await rk.run("import time; time.sleep(30)", timeout=1)
    assert res.status == "timeout" and "kept" in res.message

    old = rk.kernel_id
    await rk.restart()
    assert rk.kernel_id != old and rk.is_alive
    res = await rk.run("kept")
    assert res.status == "error" and "NameError" in res.message


async def test_killed_remote_kernel_is_noticed_and_replaced(rk, gateway):
    gw, gwp = gateway
    pid = int(await rk.eval("__import__('os').getpid()"))
    assert pid in [c.pid for c in psutil.Process(gwp.pid).children(recursive=True)]
    gen = rk.generation
    ex = rk.execute("import time; time.sleep(60)")
    await asyncio.sleep(0.8)
    os.kill(pid, signal.SIGKILL)
    res = await asyncio.wait_for(ex.wait(), 30)
    assert res.status == "died", res
    assert "gone" in res.message and "next run starts a fresh kernel" in res.message
    assert not rk.is_alive
    res = await rk.run("print('again')")
    assert res.ok and res.outputs[0]["text"] == "again\n"
    assert rk.generation == gen + 1
    # the dead one's leftovers (the gateway restarted it) were deleted: only ours is left
    ids = [k["id"] for k in _remote_kernels(gw)]
    assert rk.kernel_id in ids


async def test_a_cell_that_exits_the_kernel(rk):
    res = await rk.run("import os; os._exit(3)")
    assert res.status == "died"
    assert (await rk.run("1 + 1")).outputs[-1]["data"]["text/plain"] == "2"


async def test_shutdown_deletes_the_remote_kernel(gateway, tmp_path):
    gw, _ = gateway
    k = RemoteKernel(gateway=gw, choice=Choice(gateway="python3"), cwd=tmp_path)
    await k.start()
    kid = k.kernel_id
    assert kid in [x["id"] for x in _remote_kernels(gw)]
    await k.shutdown()
    assert kid not in [x["id"] for x in _remote_kernels(gw)]
    assert not k.is_alive and k.containment is None


async def test_a_dialogue_end_to_end_through_the_service(gateway, tmp_path, monkeypatch):
    """The config names the gateway; the dialogue chooses its python3 kernel; a code message
    runs there through the service; the kernel is deleted with the app."""
    gw, _ = gateway
    from dialogue.document import Kind
    from dialogue.service import DialogueService
    monkeypatch.setenv("DIALOGUE_GATEWAY_URL", gw.url)
    monkeypatch.setenv("DIALOGUE_GATEWAY_TOKEN", TOKEN)
    svc = DialogueService(tmp_path / "d.db", kernel_idle_timeout=None)
    try:
        d = svc.create("remote")
        assert svc.gateway_specs()["python3"]
        with pytest.raises(GatewayError, match="no kernel named 'nope'"):
            svc.set_kernel(d.id, gateway="nope")
        with pytest.raises(ValueError, match="not both"):
            svc.set_kernel(d.id, "python3", gateway="python3")
        await svc.use_kernel(d.id, gateway="python3")
        assert svc.kernel_choice(d.id) == Choice(gateway="python3")
        m = svc.add(d.id, Kind.code, "import os\nprint(os.getpid())")
        done = await svc.run(d.id, m.id)
        assert svc.run_status(done) == "ok", done.outputs
        k = svc.kernels.peek(d.id)
        assert isinstance(k, RemoteKernel) and k.containment == "remote"
        assert int(done.outputs[0]["text"]) != os.getpid()
        kid = k.kernel_id
        assert kid in [x["id"] for x in _remote_kernels(gw)]
        # back to the local kernel: the remote one is shut down at once
        await svc.use_kernel(d.id, None)
        assert kid not in [x["id"] for x in _remote_kernels(gw)]
        await svc.use_kernel(d.id, gateway="python3")
        done = await svc.run(d.id, m.id)
        kid = svc.kernels.peek(d.id).kernel_id
        # a file choosing the gateway's kernel is set aside, and exports never carry the choice
        import json
        import nbformat
        from dialogue.artifacts import read_notebook, to_ipynb_bytes
        nb = nbformat.v4.new_notebook(metadata={"kernel": {"gateway": "python3"}},
                                      cells=[nbformat.v4.new_code_cell("1")])
        imp = svc.import_dialogue(read_notebook(json.loads(nbformat.writes(nb)), name="nb"))
        assert "kernel" not in imp.meta and imp.meta["import"]["kernel"] == {"gateway": "python3"}
        assert svc.kernel_choice(imp.id).is_default
        out = to_ipynb_bytes(svc.for_notebook(svc.open(d.id))).decode()
        assert '"gateway"' not in out and gw.url not in out and TOKEN not in out
    finally:
        await svc.aclose()
    assert kid not in [x["id"] for x in _remote_kernels(gw)]  # shut down with the app


async def test_no_gateway_configured(tmp_path, monkeypatch):
    from dialogue.service import DialogueService
    monkeypatch.delenv("DIALOGUE_GATEWAY_URL", raising=False)
    svc = DialogueService(tmp_path / "d.db", kernel_idle_timeout=None)
    try:
        d = svc.create("x")
        assert svc.gateway_specs() == {}
        with pytest.raises(GatewayError, match="no kernel gateway is configured.*gateway_url"):
            svc.set_kernel(d.id, gateway="python3")
        # chosen while one was configured, run after it was taken out of the config: the run
        # says so (as a kernel that cannot start does), nothing raises
        from dialogue.document import Kind
        from dialogue.kernel.specs import KEY
        svc.store.update_dialogue(d.id, base_version=d.version, op="kernel",
                                  meta={**d.meta, KEY: {"gateway": "python3"}})
        m = svc.add(d.id, Kind.code, "1 + 1")
        done = await svc.run(d.id, m.id)
        assert svc.run_status(done) != "ok"
        assert "no kernel gateway is configured" in json.dumps(done.outputs) + json.dumps(done.meta)
    finally:
        await svc.aclose()


async def test_the_cli_lists_chooses_and_runs_on_the_gateway(gateway, tmp_path):
    """`dialogue kernel` in real processes: the gateway's kernels listed beside the local ones,
    `--gateway SPEC` chosen, a code message run there; a wrong token is said, not crashed on."""
    gw, _ = gateway
    env = {**os.environ, "DIALOGUE_DB": str(tmp_path / "cli.db"), "COLUMNS": "200",
           "DIALOGUE_HOME": str(tmp_path / "home"), "DIALOGUE_GATEWAY_URL": gw.url,
           "DIALOGUE_GATEWAY_TOKEN": TOKEN}

    def cli(*args, env=env):
        return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                              text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)

    r = cli("kernel")
    assert r.returncode == 0, r.stderr
    assert re.search(r"python3\s+Python 3 \(ipykernel\)\s+gateway", r.stdout), r.stdout
    assert cli("new", "far").returncode == 0
    r = cli("kernel", "far", "--gateway", "python3")
    assert r.returncode == 0 and "python3 (gateway)" in r.stdout, r.stdout + r.stderr
    r = cli("kernel", "far", "--gateway", "nope")
    assert r.returncode != 0 and "no kernel named 'nope'" in r.stderr
    r = cli("add", "far", "--code", "import os; print('pid', os.getpid())", "--run")
    assert r.returncode == 0, r.stderr
    pid = int(re.search(r"pid (\d+)", r.stdout).group(1))
    assert pid != os.getpid()
    assert _remote_kernels(gw) == []  # the CLI's kernel was deleted as it exited
    bad = {**env, "DIALOGUE_GATEWAY_TOKEN": "wrong"}
    r = cli("kernel", env=bad)
    assert r.returncode == 0 and "refused" in r.stdout and "gateway_token" in r.stdout
    r = cli("add", "far", "--code", "1", "--run", env=bad)
    assert "refused" in r.stdout + r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory):
    """jupyter_server itself, whose REST and websocket kernel API is the one gateways speak."""
    url, p = gateways.start(tmp_path_factory.mktemp("js"), "jupyter_server")
    yield Gateway(url, TOKEN)
    gateways.stop(p)


async def test_a_jupyter_server_works_as_the_gateway(jupyter_server, tmp_path):
    gw = jupyter_server
    with pytest.raises(GatewayError, match="refused"):
        await asyncio.to_thread(Gateway(gw.url, "wrong").specs)
    k = RemoteKernel(gateway=gw, choice=Choice(gateway="python3"), cwd=tmp_path)
    try:
        ex = k.execute("n = input('q? ')\nprint(n * 2)", allow_stdin=True)
        async for out in ex:
            if out["output_type"] == "input_request":
                ex.reply("ab")
        res = await ex
        assert res.ok and "".join(o["text"] for o in res.outputs) == "q? ab\nabab\n"
        ex = k.execute("import time; time.sleep(30)")
        await asyncio.sleep(1)
        await k.interrupt()
        assert (await ex).status == "interrupted"
        kid = k.kernel_id
    finally:
        await k.shutdown()
    assert kid not in [x["id"] for x in _remote_kernels(gw)]


async def test_the_python_api_chooses_a_gateway_kernel(gateway, tmp_path, monkeypatch):
    """`Dialogue.set_kernel(gateway=...)` in a plain script (its own thread here, as a script
    has no event loop): the code runs on the gateway."""
    gw, _ = gateway
    from dialogue import Dialogue, api
    monkeypatch.setenv("DIALOGUE_GATEWAY_URL", gw.url)
    monkeypatch.setenv("DIALOGUE_GATEWAY_TOKEN", TOKEN)

    def script():
        try:
            d = Dialogue.create("far", db=tmp_path / "a.db")
            d.set_kernel(gateway="python3")
            assert d.kernel == {"gateway": "python3"}
            done = d.run(d.add_code("import os; print(os.getpid())"))
            assert int(done.outputs[0]["text"]) != os.getpid()
            assert len(_remote_kernels(gw)) == 1
        finally:
            api.shutdown()

    await asyncio.to_thread(script)
    assert _remote_kernels(gw) == []
