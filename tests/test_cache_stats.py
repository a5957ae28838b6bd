"""`dialogue cache stats` tells its rows apart: each saved prefix with its length, when a prompt
last used it and the dialogue it was saved for (real answers of the bundled model)."""
import json

from dialogue.service import DialogueService

from test_service_surface import cli


def test_cache_stats_names_the_dialogue_of_each_prefix(tmp_path):
    for name, system in (("alpha notes", "You answer in one word."),
                         ("beta notes", "You are terse and answer in two words at most.")):
        assert cli(tmp_path, "new", name, "--system", system).returncode == 0
        s = DialogueService(tmp_path / "cli.db")
        s.update(name, meta={"max_tokens": 4})
        s.close()
        r = cli(tmp_path, "ask", name, "Say hi.")
        assert r.returncode == 0, r.stderr
    js = json.loads(cli(tmp_path, "cache", "stats", "--json").stdout)
    prefixes = [p for ns in js["namespaces"] for p in ns["prefixes"]]
    assert {p["dialogue"] for p in prefixes} == {"alpha notes", "beta notes"}
    assert all(p["tokens"] > 0 and p["last_used"] > 0 and p["bytes"] > 0 for p in prefixes)
    # newest use first
    assert [p["last_used"] for p in prefixes] == sorted((p["last_used"] for p in prefixes),
                                                        reverse=True)
    shown = cli(tmp_path, "cache", "stats").stdout
    rows = [ln for ln in shown.splitlines() if "notes" in ln]
    assert len(rows) == len(prefixes) and rows[0].strip().split()[0].replace(",", "").isdigit()
    assert "saved for" in shown and "beta notes" in rows[0]  # the last saved is the last used
    # a dialogue in the trash is said to be there
    assert cli(tmp_path, "rm", "alpha notes").returncode == 0
    assert "alpha notes (in the trash)" in cli(tmp_path, "cache", "stats").stdout
    # clearing deletes the notes with the states
    assert cli(tmp_path, "cache", "clear").returncode == 0
    assert not list((tmp_path / "kv").glob("*/*.json")) or \
        all(p.name == "meta.json" for p in (tmp_path / "kv").glob("*/*.json"))
