"""A kernel on a gateway, chosen in a real browser: the header's picker lists the kernels of the
gateway the server's config names, a cell runs there, and back to the local kernel the remote one
is shut down. A real Kernel Gateway on 127.0.0.1, a real server, headless Chromium."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from types import SimpleNamespace

import pytest
from playwright.sync_api import Page, expect

import gateways
from browserutil import free_port, start_server, stored

pytestmark = [pytest.mark.browser, pytest.mark.slow]
pytest.importorskip("kernel_gateway", reason="the [test] extra's jupyter_kernel_gateway")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwweb")
    url, gw = gateways.start(tmp)
    port = free_port()
    db, log = tmp / "dialogue.db", tmp / "server.log"
    prelude = (f"import os; os.environ['DIALOGUE_GATEWAY_URL'] = {url!r}; "
               f"os.environ['DIALOGUE_GATEWAY_TOKEN'] = {gateways.TOKEN!r}")
    proc = start_server(tmp, db, port, log=log, prelude=prelude)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", db=db, proc=proc, log=log, gateway=url)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    # the server shut its remote kernel down as it exited
    assert gateways.kernels(url) == []
    gateways.stop(gw)


def test_the_picker_chooses_a_gateway_kernel(page: Page, server) -> None:
    page.goto(server.url + "/")
    page.fill("#new-form input[name=name]", "far")
    page.press("#new-form input[name=name]", "Enter")
    page.wait_for_url(re.compile(r"/d/[0-9a-f]+$"))
    did = page.url.rsplit("/", 1)[1]
    pick = page.locator("#kernel-pick")
    pick.select_option(label="Python 3 (ipykernel) (gateway)")
    expect(page.locator("#toast")).to_contain_text("Kernel: python3 (gateway)")
    assert stored(server, did).meta["kernel"] == {"gateway": "python3"}
    page.keyboard.press("Escape")
    page.locator("[data-act=append-code]").click()
    # type only once the new cell's editor is open (keys pressed before it exists are lost)
    expect(page.locator("#cells > .cell").nth(0)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("import os; print('pid', os.getpid())")
    page.keyboard.press("Control+Enter")
    out = page.locator("#cells > .cell").nth(0).locator(".outputs")
    expect(out).to_contain_text("pid ", timeout=60_000)
    pid = int(out.inner_text().split()[-1])
    assert pid != server.proc.pid and pid != os.getpid()
    assert len(gateways.kernels(server.gateway)) == 1
    # the choice survives a reload; back to the local kernel shuts the remote one down
    page.reload()
    expect(page.locator("#kernel-pick option:checked")).to_have_text("Python 3 (ipykernel) (gateway)")
    page.locator("#kernel-pick").select_option(label="Python 3 (dialogue)")
    expect(page.locator("#toast")).to_contain_text("Kernel: Python 3 (dialogue)")
    assert gateways.kernels(server.gateway) == []
    # and again on the gateway, left running for the server's exit to end
    page.locator("#kernel-pick").select_option(label="Python 3 (ipykernel) (gateway)")
    expect(page.locator("#toast")).to_contain_text("Kernel: python3 (gateway)")
    page.keyboard.press("Escape")
    page.locator("[data-act=append-code]").click()
    expect(page.locator("#cells > .cell").nth(1)).to_have_class(re.compile(r"\bediting\b"))
    page.keyboard.type("print('there', os.getpid() == %d)" % pid)
    page.keyboard.press("Control+Enter")
    # a fresh kernel on the gateway: `os` is not imported there any more
    expect(page.locator("#cells > .cell").nth(1).locator(".outputs")).to_contain_text(
        "NameError", timeout=60_000)
    assert len(gateways.kernels(server.gateway)) == 1
    assert page.watch.errors == [], page.watch.errors
