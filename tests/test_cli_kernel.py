"""The CLI and kernels: `dialogue kernel` lists and chooses, and input() in a cell is answered on
the terminal (a real pseudo-terminal: getpass turns its echo off), or fails at once when standard
input is not one. Real processes, a real database, real venvs and kernelspecs."""
from __future__ import annotations

import errno
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelenvs import make_venv, write_kernelspec

from dialogue.service import DialogueService

# the prompts are built at run time: the progress line shows a cell's first line, and the test
# must type only once the prompt itself is on the terminal
ASK = ("name = input('Na' + 'me? ')\n"
       "import getpass\n"
       "pw = getpass.getpass('Password: ')\n"
       "print('hello', name, len(pw))")


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    root = tmp_path_factory.mktemp("envs")
    return (make_venv(root / "good", with_ipykernel=True),
            make_venv(root / "bare", with_ipykernel=False))


@pytest.fixture
def env(tmp_path, envs) -> dict[str, str]:
    write_kernelspec(tmp_path / "jupyter", "otherpy", envs[0], "Other Python")
    return {**os.environ, "DIALOGUE_DB": str(tmp_path / "cli.db"), "COLUMNS": "200",
            "JUPYTER_PATH": str(tmp_path / "jupyter"), "DIALOGUE_HOME": str(tmp_path / "home")}


def cli(env, *args: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                          text=True, env=env, timeout=180, stdin=stdin)


def _next_bytes(fd: int, deadline: float) -> bytes:
    """What the terminal shows next; b"" once the CLI has closed it (Linux reports EIO)."""
    if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise TimeoutError("the CLI wrote nothing more to its terminal")
    try:
        return os.read(fd, 4096)
    except OSError as e:
        if e.errno == errno.EIO:
            return b""
        raise


def on_terminal(env, args: list[str], answers: list[tuple[str, str]]) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (its controlling terminal, so getpass uses it); type
    each answer once its prompt has appeared. (exit status, everything the terminal showed)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI
        os.execve(sys.executable, [sys.executable, "-m", "dialogue.cli", *args], env)
    shown = bytearray()
    answered_at = 0  # where the terminal's text after the last answer starts
    todo = list(answers)
    deadline = time.monotonic() + 180
    try:
        while data := _next_bytes(fd, deadline):
            shown += data
            if todo and todo[0][0].encode() in shown[answered_at:]:
                os.write(fd, todo.pop(0)[1].encode() + b"\n")
                answered_at = len(shown)
    except TimeoutError as e:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"{e}; it showed:\n{shown.decode(errors='replace')}") from None
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_kernel_lists_and_chooses(env, envs):
    good, bare = envs
    r = cli(env, "kernel")
    assert r.returncode == 0, r.stderr
    assert "otherpy" in r.stdout and "Other Python" in r.stdout and "python3" in r.stdout
    assert cli(env, "new", "k").returncode == 0
    r = cli(env, "kernel", "k")
    assert r.returncode == 0 and "kernel Python 3 (dialogue)" in r.stdout
    r = cli(env, "kernel", "k", "otherpy")
    assert r.returncode == 0 and "kernel Other Python (the next run starts it)" in r.stdout
    r = cli(env, "config", "k")
    assert r.returncode == 0 and re.search(r"kernel\s+Other Python", r.stdout), r.stdout
    svc = DialogueService(env["DIALOGUE_DB"])
    try:
        svc.add("k", "code", "import sys; print(sys.executable)")
    finally:
        svc.close()
    r = cli(env, "run", "k")
    assert r.returncode == 0, r.stderr
    svc = DialogueService(env["DIALOGUE_DB"])
    try:
        assert svc.open("k").messages[0].outputs[0]["text"] == good + "\n"
    finally:
        svc.close()
    # refused, with what to do, and nothing changes
    r = cli(env, "kernel", "k", "--python", bare)
    assert r.returncode == 1 and f"{bare} -m pip install ipykernel" in r.stderr
    r = cli(env, "kernel", "k", "nosuch")
    assert r.returncode == 1 and "no Jupyter kernel named 'nosuch'" in r.stderr
    r = cli(env, "kernel", "k", "otherpy", "--default")
    assert r.returncode == 1 and "one of SPEC, --python PATH, --gateway SPEC or --default" in r.stderr
    r = cli(env, "kernel", "k", "--python", good)
    assert r.returncode == 0 and f"kernel Python: {good}" in r.stdout
    r = cli(env, "kernel", "k", "--default")
    assert r.returncode == 0 and "kernel Python 3 (dialogue)" in r.stdout
    svc = DialogueService(env["DIALOGUE_DB"])
    try:
        assert "kernel" not in svc.open("k").meta
    finally:
        svc.close()


def _dialogue_with(env, code: str) -> None:
    svc = DialogueService(env["DIALOGUE_DB"])
    try:
        svc.create("asks")
        svc.add("asks", "code", code)
    finally:
        svc.close()


def test_run_answers_input_on_the_terminal(env):
    _dialogue_with(env, ASK)
    rc, shown = on_terminal(env, ["run", "asks"], [("Name? ", "Ada"), ("Password: ", "hunter2")])
    assert rc == 0, shown
    assert "Ada" in shown  # typed, and echoed by the terminal
    assert "hunter2" not in shown  # getpass: the terminal did not echo it
    svc = DialogueService(env["DIALOGUE_DB"])
    try:
        out = svc.open("asks").messages[0].outputs
    finally:
        svc.close()
    assert out[0]["text"] == "Name? Ada\nPassword: \nhello Ada 7\n"


def test_exec_shows_the_answered_line_once(env):
    _dialogue_with(env, "print('got', input('Your ' + 'name: '))")
    rc, shown = on_terminal(env, ["exec", "asks", "1"], [("Your name: ", "Grace")])
    assert rc == 0, shown
    lines = shown.replace("\r\n", "\n").split("\n")
    assert lines.count("Your name: Grace") == 1, shown  # the terminal's, not repeated
    assert "got Grace" in lines


def test_input_without_a_terminal_fails_at_once(env):
    _dialogue_with(env, "input('Name? ')")
    t0 = time.monotonic()
    r = cli(env, "run", "asks")
    assert r.returncode == 1
    assert "StdinNotImplementedError" in r.stderr and "standard input is not one" in r.stderr
    assert time.monotonic() - t0 < 60
