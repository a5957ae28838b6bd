"""`dialogue export`: `-o -` writes to standard output, and hidden messages are told or kept."""
import json

import pytest

from test_cli import ok, run


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "x.db"
    ok(path, "new", "post")
    ok(path, "add", "post", "--note", "# Title\n\nvisible prose")
    ok(path, "add", "post", "--code", "secret = 42", "--hide")
    ok(path, "add", "post", "--code", "print('shown')", "--export")
    return path


@pytest.mark.parametrize("fmt", ["ipynb", "py", "md", "html"])
def test_export_to_standard_output(db, tmp_path, fmt):
    r = run(db, "export", "post", "--to", fmt, "-o", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "-").exists() and "wrote" not in r.stdout
    if fmt == "ipynb":
        nb = json.loads(r.stdout)
        assert [c["cell_type"] for c in nb["cells"]][:1] == ["markdown"]
    elif fmt == "py":
        assert "print('shown')" in r.stdout and "secret" not in r.stdout
    else:
        assert "visible prose" in r.stdout and "shown" in r.stdout and "secret" not in r.stdout


@pytest.mark.parametrize("fmt", ["md", "html"])
def test_hidden_messages_are_told_or_kept(db, tmp_path, fmt):
    r = run(db, "export", "post", "--to", fmt, "-o", "-")
    assert r.returncode == 0 and "secret" not in r.stdout
    assert "1 hidden message left out (--with-hidden keeps them)" in r.stderr
    r = run(db, "export", "post", "--to", fmt, "-o", "-", "--with-hidden")
    assert r.returncode == 0 and "secret" in r.stdout and "hidden" not in r.stderr
    out = tmp_path / f"post.{fmt}"
    r = run(db, "export", "post", "--to", fmt, "-o", str(out), "--with-hidden")
    assert r.returncode == 0 and "secret" in out.read_text() and f"wrote {out}" in r.stdout


def test_the_hidden_count_leaves_out_what_with_hidden_would_not_show(tmp_path):
    """A hidden code cell marked `#| hide` stays out of a post even with --with-hidden, so it is
    not counted among the hidden messages the export says it left out."""
    path = tmp_path / "h.db"
    ok(path, "new", "post")
    ok(path, "add", "post", "--note", "prose")
    ok(path, "add", "post", "--code", "a = 1", "--hide")
    ok(path, "add", "post", "--code", "#| hide\nb = 2", "--hide")
    r = run(path, "export", "post", "--to", "md", "-o", "-", cwd=tmp_path)
    assert r.returncode == 0 and "1 hidden message left out" in r.stderr, r.stderr
