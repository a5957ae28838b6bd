"""Numbers as pictures in the web app: a training run's page (its plot built from the run's
metrics, inline, every word escaped), the list of runs, the cache's size and hit rate, and a
dialogue's chart of tokens and cost over its answers (an unknown cost said, not guessed)."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

from dialogue.local.kvcache import KVCache
from dialogue.training_runs import record
from webutil import Tags

SVG = "{http://www.w3.org/2000/svg}"


def words(html: str) -> str:
    return " ".join(t.strip() for t in Tags(html).text if t.strip())


def svg_texts(html: str) -> list[str]:
    start, end = html.index("<svg"), html.index("</svg>") + len("</svg>")
    return ["".join(t.itertext()) for t in ET.fromstring(html[start:end]).iter(f"{SVG}text")]


def _run(folder, steps=20, evil="<img src=x onerror=alert(1)>"):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "p": (s - 1) / steps, "loss": 3 - s / steps, "lr": 1e-3,
                                "mix": {"docs": 0.5, evil: 0.5}}) + "\n")
    record(folder)
    return folder


def test_training_runs_are_listed_and_each_shows_its_labelled_plot(client, env):
    _run(env / "runs" / "first")
    gone = _run(env / "runs" / "deleted-later")
    (gone / "metrics.jsonl").unlink()  # a folder the user cleaned up drops out of the list
    page = client.get("/training")
    assert page.status_code == 200
    links = [a["href"] for a in Tags(page.text).find("a") if a["href"].startswith("/training/")]
    assert len(links) == 1 and "first" in words(page.text) and "deleted-later" not in page.text
    assert "20 of 20" in words(page.text) and "2.95 → 2" in words(page.text)
    run = client.get(links[0])
    assert run.status_code == 200
    t = svg_texts(run.text)  # inline, well-formed
    assert {"loss", "learning rate", "data mix (weight per source)", "step (of 20)"} <= set(t)
    assert "<img" not in run.text and "&lt;img src=x onerror=alert(1)&gt; 0.5" in run.text  # text, not markup
    assert "loss  " in words(run.text)  # the summary's sparkline line
    assert client.get("/training/0123456789abcdef").status_code == 404


def test_the_cache_page_shows_size_and_hit_rate(client, env):
    cache = KVCache(os.environ["DIALOGUE_CACHE_DIR"])
    assert "no lookups yet" in words(client.get("/cache").text)
    cache._count(hits=3, misses=1)  # as the model's process counts its lookups
    KVCache(os.environ["DIALOGUE_CACHE_DIR"])._count(saves=2)  # another process, the same folder
    text = words(client.get("/cache").text)
    assert "hit rate 75% (3 of 4 lookups found a saved prefix)" in text
    assert "saved, evicted, damaged 2, 0, 0" in text and "0 B of 4.0 GB in 0 saved prefixes" in text
    index = Tags(client.get("/").text)
    assert {a["href"] for a in index.find("a")} >= {"/training", "/cache"}


def test_a_dialogues_header_charts_tokens_and_cost_over_its_answers(client, db):
    d = db.create("costs")
    assert "tokens and cost" not in client.get(f"/d/{d.id}").text  # no answers: no chart
    db.add(d.id, "prompt", "a?", response="A.", usage={"input": 100, "output": 10, "cost": 0.01, "model": "m"})
    db.add(d.id, "code", "1 + 1")
    db.add(d.id, "prompt", "b?", response="B.", usage={"input": 50, "cache_read": 100, "output": 20,
                                                       "cost": None, "model": "openai-compatible:x/y"})
    page = client.get(f"/d/{d.id}").text
    box = page[page.index('id="totals"'):]
    t = svg_texts(box)
    assert "tokens" in t and "new in 50" in t and "from cache 100" in t and "out 20" in t
    assert "cost not known for 1 of 2 answers (not counted)" in t and "total $ 0.01" in t
    assert {"1", "2"} <= set(t)  # the answers on the x axis
