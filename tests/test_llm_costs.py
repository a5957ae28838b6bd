"""What an answer costs, as every surface shows it: the price database's figure for a priced model,
"cost unknown" (never a guess, never $0) for one it does not know. The models answer through the
official SDK against a local server speaking the OpenAI protocol (tests/servers.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fasthtml.common import to_xml

from dialogue.document import Dialogue, Kind, Message
from dialogue.service import DialogueService
from servers import ReplayServer, openai_chunks, sse


def cli(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "400", "DIALOGUE_HOME": str(db.parent / "home"),
         "DIALOGUE_CACHE_DIR": str(db.parent / "kv"), **(env or {})}
    for k in ("FORCE_COLOR", "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY"):
        if k not in (env or {}):
            e.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True, text=True,
                       env=e, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def last_usage(db: Path) -> dict:
    svc = DialogueService(db)
    try:
        return svc.open("chat").messages[-1].usage
    finally:
        svc.close()


def test_the_cli_prints_the_price_of_a_priced_model(tmp_path):
    db = tmp_path / "c.db"
    with ReplayServer() as srv:
        # gpt-4.1-mini: $0.40 / MTok input, $1.60 / MTok output
        srv.push(sse(openai_chunks(["Hi."], usage={"prompt_tokens": 10_000, "completion_tokens": 2_500})))
        env = {"OPENAI_BASE_URL": srv.openai_base_url, "OPENAI_API_KEY": "sk-test"}
        cli(db, "new", "chat", "--model", "gpt-4.1-mini", env=env)
        r = cli(db, "ask", "chat", "say hi", env=env)
    assert r.stdout.strip() == "Hi."
    assert "$0.0080" in r.stderr, r.stderr  # 10,000 * 0.4e-6 + 2,500 * 1.6e-6
    assert last_usage(db)["cost"] == pytest.approx(0.008)


def test_the_cli_says_unknown_for_a_model_with_no_known_price(tmp_path):
    db = tmp_path / "c.db"
    with ReplayServer() as srv:
        srv.push(sse(openai_chunks(["Hi."])))
        cli(db, "new", "chat", "--model", f"openai-compatible:{srv.openai_base_url}/my-model")
        r = cli(db, "ask", "chat", "say hi")
    assert "cost unknown" in r.stderr and "$" not in r.stderr, r.stderr
    u = last_usage(db)  # what the Python API hands back: None, not 0
    assert "cost" in u and u["cost"] is None and u["input"] == 40


def test_the_web_shows_unknown_cost_per_answer_and_in_the_totals():
    from dialogue.web import views
    priced = Message(kind=Kind.prompt, source="a", response="b",
                     usage={"input": 10, "output": 5, "model": "gpt-4.1-mini", "cost": 0.25})
    unpriced = Message(kind=Kind.prompt, source="a", response="b",
                       usage={"input": 10, "output": 5, "model": "openai-compatible:http://h/v1/m", "cost": None})
    assert "cost unknown" in to_xml(views.usage_line(unpriced))
    assert "$0.2500" in to_xml(views.usage_line(priced))
    both = to_xml(views.totals(Dialogue("d", messages=[priced, unpriced])))
    assert "$0.2500+?" in both and "some models have no known price" in both
    assert "+?" not in to_xml(views.totals(Dialogue("d", messages=[priced])))
