"""`dialogue ask` while the model reads a long prompt: the progress goes to stderr (one line
rewritten with \\r on a terminal, a few plain lines otherwise), the answer alone to stdout. A real
process and database; the model is a stand-in that reports reading progress as the local model
does (tests/reading_provider.py), since how the terminal shows it is what is tested here."""
from __future__ import annotations

import errno
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
MODEL = "test-reading:total=1280,chunk=128,delay=0.1,rate=100"
# the CLI with the stand-in model registered, as `dialogue` itself would run
LAUNCH = ("import sys, reading_provider; reading_provider.install(); "
          "from dialogue.cli.main import main; sys.exit(main(sys.argv[1:]))")


def _env(db: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "DIALOGUE_DB": str(db), "PYTHONPATH": path, "COLUMNS": "120",
            "DIALOGUE_HOME": str(db.parent / "home")}


def cli(db: Path, *args: str, stderr_tty: bool = False) -> tuple[int, str, str]:
    """Run the CLI; (exit status, stdout, stderr). With `stderr_tty`, stderr is a pseudo-terminal
    (as in an interactive shell) while stdout stays a pipe (as in `dialogue ask ... > file`)."""
    cmd = [sys.executable, "-c", LAUNCH, *args]
    if not stderr_tty:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(db), timeout=120)
        return r.returncode, r.stdout, r.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env=_env(db))
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                raise AssertionError("the CLI wrote nothing to its terminal for 120 s")
            try:
                data = os.read(master, 4096)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        rc = proc.wait(60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return rc, out, b"".join(chunks).decode()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    db = tmp_path / "cli.db"
    rc, _, err = cli(db, "new", "long", "--model", MODEL)
    assert rc == 0, err
    return db


def test_ask_on_a_terminal_rewrites_one_progress_line_on_stderr(db):
    rc, out, err = cli(db, "ask", "long", "What is 2+2?", stderr_tty=True)
    assert rc == 0, err
    assert out == "The answer is 4.\n"  # stdout: the answer and nothing else
    assert "reading the prompt: 128 / 1,280 tokens" in err
    assert "reading the prompt: 640 / 1,280 tokens · about 6 s left" in err  # 640 at 100/s
    # one terminal line, rewritten in place: no line break between two reports
    reading = [ln for ln in err.replace("\r\n", "\n").split("\n") if "reading the prompt" in ln]
    assert len(reading) == 1 and reading[0].count("\r\x1b[K") >= 5, err
    # and erased once the answer comes: what stays on the screen is the usage line alone
    assert screen(err) == [
        "test-reading:total=1280,chunk=128,delay=0.1,rate=100: 1280 in (0 from cache), 3 out, "
        "cost unknown"]  # a test provider has no price: said, never guessed


def screen(tty_output: str) -> list[str]:
    """The lines a terminal shows after `tty_output`, for the few controls the CLI writes: \\r
    (back to the line's start), ESC[K (erase to its end), and colour codes (ignored)."""
    import re
    lines = []
    for raw in tty_output.replace("\r\n", "\n").split("\n"):
        line, col = "", 0
        for tok in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\r|[^\x1b\r]+", raw):
            if tok == "\r":
                col = 0
            elif tok == "\x1b[K":
                line = line[:col]
            elif tok.startswith("\x1b"):
                continue
            else:
                line = line[:col] + tok + line[col + len(tok):]
                col += len(tok)
        lines.append(line)
    return [ln for ln in lines if ln.strip()]


def test_ask_into_a_log_prints_a_few_plain_lines(db):
    rc, out, err = cli(db, "ask", "long", "What is 2+2?")
    assert rc == 0, err
    assert out == "The answer is 4.\n" and "reading" not in out
    assert "\r" not in err and "\x1b" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("reading the prompt")]
    # ten reports of 128 tokens: the first, then one per quarter read
    assert lines == ["reading the prompt: 128 / 1,280 tokens",
                     "reading the prompt: 384 / 1,280 tokens · about 9 s left",
                     "reading the prompt: 640 / 1,280 tokens · about 6 s left",
                     "reading the prompt: 1,024 / 1,280 tokens · a few seconds left",
                     "reading the prompt: 1,280 / 1,280 tokens"], err


def test_add_run_and_run_show_progress_too(db):
    rc, out, err = cli(db, "add", "long", "--prompt", "And 3+3?", "--run")
    assert rc == 0, err
    assert out == "The answer is 4.\n"
    assert "reading the prompt: 1,280 / 1,280 tokens" in err
    # `dialogue run` shows it in its progress line (rich redraws that line on a terminal)
    rc, out, err = cli(db, "run", "long", stderr_tty=True)
    assert rc == 0, err
    assert "reading the prompt: " in err and "Traceback" not in err and "Task exception" not in err


def test_a_short_prompt_read_in_one_go_prints_no_progress(tmp_path):
    db = tmp_path / "cli.db"
    assert cli(db, "new", "short", "--model", "test-reading:total=100,chunk=128")[0] == 0
    rc, out, err = cli(db, "ask", "short", "Hi")
    assert rc == 0, err
    assert out == "The answer is 4.\n" and "reading the prompt" not in err
