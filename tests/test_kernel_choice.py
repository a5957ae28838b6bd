"""A dialogue's kernel: an installed Jupyter kernelspec or a Python interpreter instead of the
app's own, with real interpreters (venvs made here) and real kernelspecs in a temporary
JUPYTER_PATH; stored with the dialogue, written to exported notebooks, and never chosen by a file."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from kernelenvs import make_venv, write_kernelspec

from dialogue.artifacts import read_notebook, to_ipynb_bytes
from dialogue.document import Kind
from dialogue.service import DialogueService


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    root = tmp_path_factory.mktemp("envs")
    good = make_venv(root / "good", with_ipykernel=True)
    bare = make_venv(root / "bare", with_ipykernel=False)
    return good, bare


@pytest.fixture
def jupyter_path(tmp_path, monkeypatch, envs):
    """A kernelspec 'otherpy' (the usual ipykernel command line, run by the venv's python) in a
    temporary JUPYTER_PATH."""
    good, _ = envs
    kdir = write_kernelspec(tmp_path / "jupyter", "otherpy", good, "Other Python",
                            {"DIALOGUE_TEST_SPEC_ENV": "from-the-spec"})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return kdir


@pytest.fixture
async def svc(tmp_path):
    s = DialogueService(tmp_path / "d.db", kernel_idle_timeout=None)
    yield s
    await s.aclose()


WHO = "import sys, os; print(sys.executable); print(os.environ.get('DIALOGUE_TEST_SPEC_ENV'))"


async def run_code(svc, d, code):
    m = svc.add(d, Kind.code, code)
    done = await svc.run(d, m.id)
    assert svc.run_status(done) == "ok", done.outputs
    return "".join(o.get("text", "") for o in done.outputs)


async def test_a_kernelspec_runs_the_dialogues_code(svc, jupyter_path, envs):
    good, _ = envs
    assert svc.kernel_specs()["otherpy"] == "Other Python"
    d = svc.create("k")
    assert svc.kernel_choice(d.id).label() == "Python 3 (dialogue)"
    out = await run_code(svc, d.id, WHO)
    assert out.splitlines()[0] == sys.executable  # the default: the app's own interpreter
    d = await svc.use_kernel(d.id, "otherpy")
    assert d.meta["kernel"] == {"spec": "otherpy"}
    assert svc.kernel_status(d.id) == "none"  # the old kernel was shut down
    out = await run_code(svc, d.id, WHO)
    assert out.splitlines() == [good, "from-the-spec"]
    assert svc.kernel_choice(d.id).label() == "Other Python"
    # back to the default: the next run replaces the kernel (set_kernel alone, as the CLI does)
    svc.set_kernel(d.id, None)
    assert "kernel" not in svc.open(d.id).meta
    out = await run_code(svc, d.id, WHO)
    assert out.splitlines()[0] == sys.executable


async def test_a_python_interpreter_by_path(svc, envs):
    good, bare = envs
    d = svc.create("p")
    d = svc.set_kernel(d.id, python=good)
    assert d.meta["kernel"] == {"python": good}
    assert svc.kernel_choice(d.id).label() == f"Python: {good}"
    out = await run_code(svc, d.id, WHO)
    assert out.splitlines()[0] == good
    k = await svc.kernel(d.id)
    assert k.containment in ("cgroup", "subreaper")  # under the supervisor like the default
    # a $`expr` reference and tools use the helpers, installed in this kernel too
    assert await k.eval("1 + 1") == "2"


async def test_bad_choices_are_refused_with_what_to_do(svc, envs, tmp_path, jupyter_path):
    _, bare = envs
    d = svc.create("bad")
    with pytest.raises(ValueError, match=rf"{bare} -m pip install ipykernel"):
        svc.set_kernel(d.id, python=bare)
    with pytest.raises(ValueError, match="not an executable file"):
        svc.set_kernel(d.id, python=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"no Jupyter kernel named 'nosuch'.*otherpy"):
        svc.set_kernel(d.id, "nosuch")
    with pytest.raises(ValueError, match="not both"):
        svc.set_kernel(d.id, "otherpy", python=bare)
    assert "kernel" not in svc.open(d.id).meta  # nothing was stored


async def test_export_states_the_kernel(svc, jupyter_path, envs):
    good, _ = envs
    d = svc.create("e")
    # no kernel has run: the default's ipykernel metadata, from this interpreter
    nb = nbformat.reads(to_ipynb_bytes(svc.for_notebook(svc.open(d.id))).decode(), 4)
    assert nb.metadata.kernelspec == {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                      "language": "python"}
    assert nb.metadata.language_info["name"] == "python"
    assert nb.metadata.language_info["version"] == ".".join(map(str, sys.version_info[:3]))
    svc.set_kernel(d.id, "otherpy")
    nb = nbformat.reads(to_ipynb_bytes(svc.for_notebook(svc.open(d.id))).decode(), 4)
    assert nb.metadata.kernelspec == {"name": "otherpy", "display_name": "Other Python",
                                      "language": "python"}
    assert nb.metadata.language_info == {"name": "python"}  # not run yet: the spec's language
    assert "kernel" not in nb.metadata  # the choice itself stays here
    await run_code(svc, d.id, "x = 1")
    nb = nbformat.reads(to_ipynb_bytes(svc.for_notebook(svc.open(d.id))).decode(), 4)
    info = nb.metadata.language_info  # the kernel's own kernel_info reply
    assert info["name"] == "python" and info["file_extension"] == ".py" and info["version"]
    # a python path: Jupyter's python3, so Jupyter opens it with its own Python
    svc.set_kernel(d.id, python=good)
    nb = nbformat.reads(to_ipynb_bytes(svc.for_notebook(svc.open(d.id))).decode(), 4)
    assert nb.metadata.kernelspec["name"] == "python3" and good not in json.dumps(nb.metadata)


async def test_an_imported_notebook_never_picks_the_command_line(svc, jupyter_path, envs, tmp_path):
    good, _ = envs
    evil = tmp_path / "evil.sh"
    evil.write_text("#!/bin/sh\ntouch " + str(tmp_path / "pwned") + "\n")
    evil.chmod(0o755)

    def notebook(meta):
        notebook.n = getattr(notebook, "n", 0) + 1
        nb = nbformat.v4.new_notebook(metadata=meta,
                                      cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
        return read_notebook(json.loads(nbformat.writes(nb)), name=f"nb{notebook.n}")

    # our own key with an interpreter path: set aside, with a warning
    d = svc.import_dialogue(notebook({"kernel": {"python": str(evil)},
                                      "kernelspec": {"name": "python3", "display_name": "x",
                                                     "language": "python"}}))
    assert "kernel" not in d.meta and d.meta["import"]["kernel"] == {"python": str(evil)}
    assert any("does not choose what runs its code" in w for w in d.meta["import"]["warnings"])
    done = await svc.run(d.id, d.messages[0].id)
    assert done.outputs[0]["text"].strip() == sys.executable and not (tmp_path / "pwned").exists()
    # a kernelspec that is installed here is used: by name, with the spec that is installed here
    d = svc.import_dialogue(notebook({"kernelspec": {"name": "otherpy", "display_name": "Other",
                                                     "language": "python", "argv": [str(evil)]}}))
    assert d.meta["kernel"] == {"spec": "otherpy"}
    done = await svc.run(d.id, d.messages[0].id)
    assert done.outputs[0]["text"].strip() == good and not (tmp_path / "pwned").exists()
    # one that is not: the default, and the user is told
    d = svc.import_dialogue(notebook({"kernelspec": {"name": "julia-1.9", "display_name": "Julia",
                                                     "language": "julia"}}))
    assert "kernel" not in d.meta
    assert any("'julia-1.9' is not installed here" in w for w in d.meta["import"]["warnings"])


def test_the_python_api_chooses_the_kernel_and_answers_input(tmp_path, envs, monkeypatch):
    from dialogue import Dialogue, api
    good, _ = envs
    monkeypatch.setenv("DIALOGUE_HOME", str(tmp_path / "home"))
    try:
        d = Dialogue.create("api", db=tmp_path / "a.db")
        assert d.kernel is None
        d.set_kernel(python=good)
        assert d.kernel == {"python": good}
        m = d.add_code("import sys\nprint(sys.executable, input('Who? '))")
        done = d.run(m, stdin=lambda prompt, password: prompt.strip("? ").lower())
        assert done.outputs[0]["text"] == f"Who? who\n{good} who\n"
        d.set_kernel()
        assert d.kernel is None
        assert "StdinNotImplementedError" in d.run(m).meta["run"]["message"]
    finally:
        api.shutdown()
