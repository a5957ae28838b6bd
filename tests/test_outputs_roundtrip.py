"""A notebook with progress bars and maths, round trip from the command line, as a user does it:
`dialogue import` a .ipynb, `dialogue run` it in a real kernel, `dialogue export` it to HTML and
back to .ipynb. Progress bars (tqdm's, a pip-style bar with erase-line codes, the issue's
`print('\\rstep', i, end='')`, a backspace spinner) come out as their last state, maths in the
notes and a `Math` output come out as MathML in the HTML, prose dollars stay prose, and the model
is shown the same collapsed text, without escape codes."""
from __future__ import annotations

import html as htmlmod
import os
import re
import subprocess
import sys

import nbformat

from dialogue.context import build
from dialogue.service import DialogueService

NOTE = ("# Progress and maths\n\n"
        "The loss is $L(\\theta) = \\frac{1}{n}\\sum_i (y_i - f_\\theta(x_i))^2$; a run costs "
        "$5 and $10 with the GPU.\n\n$$\n\\nabla_\\theta L = 0\n$$")
TQDM = ("from tqdm import tqdm\nimport time\n"
        "for _ in tqdm(range(40), desc='training', ascii=True, mininterval=0, ncols=60):\n"
        "    time.sleep(0.005)")
PIP = ("import sys, time\n"
       "for i in range(1, 8):\n"
       "    bar = '━' * i + ' ' * (7 - i)\n"
       "    print(f'\\r\\x1b[2K   \\x1b[32m{bar}\\x1b[0m {i}/7 [matplotlib]', end='', flush=True)\n"
       "    time.sleep(0.01)\n"
       "print('\\nSuccessfully installed matplotlib')")
STEPS = ("import time\nfor i in range(10):\n    print('\\rstep', i, end='')\n"
         "    sys.stdout.flush(); time.sleep(0.01)\nprint()")
SPINNER = ("print('spinning |', end='', flush=True)\n"
           "for c in '/-\\\\|/-\\\\|':\n    print('\\b' + c, end='', flush=True)\nprint('\\bok')")
MATH = "from IPython.display import Math\nMath(r'e^{i\\pi} + 1 = 0')"

# what a front end that keeps streams as the kernel sent them saved (raw \r, one step a line)
SAVED_STEPS = "".join(f"\rstep {i}" for i in range(10)) + "\n"


def cli(db, *args):
    env = {**os.environ, "DIALOGUE_DB": str(db), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "dialogue.cli", *args], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def pre_blocks(page: str) -> list[str]:
    """The text of each output block of an exported page, as a browser shows it."""
    blocks = re.findall(r'<pre class="output [^"]*">(.*?)</pre>', page, re.S)
    return [htmlmod.unescape(re.sub(r"<[^>]+>", "", b)) for b in blocks]


def test_a_notebook_with_progress_bars_and_maths_round_trips(tmp_path):
    nb = nbformat.v4.new_notebook()
    steps = nbformat.v4.new_code_cell(STEPS)
    steps.outputs = [nbformat.v4.new_output("stream", name="stdout", text=SAVED_STEPS)]
    nb.cells = [nbformat.v4.new_markdown_cell(NOTE), nbformat.v4.new_code_cell(TQDM),
                nbformat.v4.new_code_cell(PIP), steps, nbformat.v4.new_code_cell(SPINNER),
                nbformat.v4.new_code_cell(MATH)]
    nb.cells[3].source = "import sys\n" + STEPS
    src = tmp_path / "progress.ipynb"
    nbformat.write(nb, src)
    db = tmp_path / "d.db"

    cli(db, "import", str(src), "--name", "progress")
    # the saved output shows as its last state before anything runs
    cli(db, "export", "progress", "--to", "html", "-o", str(tmp_path / "before.html"))
    assert pre_blocks((tmp_path / "before.html").read_text()) == ["step 9\n"]

    cli(db, "run", "progress")
    cli(db, "export", "progress", "--to", "html", "-o", str(tmp_path / "out.html"))
    cli(db, "export", "progress", "--to", "ipynb", "-o", str(tmp_path / "out.ipynb"))
    page = (tmp_path / "out.html").read_text()

    blocks = pre_blocks(page)
    assert all("\r" not in b and "\b" not in b and "\x1b" not in b for b in blocks), blocks
    tqdm_out = [b for b in blocks if "training" in b]
    assert len(tqdm_out) == 1 and tqdm_out[0].count("training") == 1, blocks
    assert "40/40" in tqdm_out[0] and "100%" in tqdm_out[0]
    pip_out = [b for b in blocks if "[matplotlib]" in b]
    assert pip_out == ["   ━━━━━━━ 7/7 [matplotlib]\nSuccessfully installed matplotlib\n"], blocks
    assert "step 9\n" in blocks and not any("step 8" in b for b in blocks)
    assert "spinning ok\n" in blocks
    # the pip bar keeps its colour in the page
    assert '<span class="ansi-green-fg">━━━━━━━</span> 7/7 [matplotlib]' in page

    # maths: the note's two formulas and the Math output are MathML; the prices stay prose
    assert len(re.findall(r"<math\b", page)) == 3
    assert '<span class="math inline"><math' in page and '<span class="math display"><math' in page
    # IPython's Math is "$\\displaystyle ...$": inline maths set in display style, as Jupyter has it
    latex = re.search(r'<div class="output latex">(.*?)</div>', page, re.S).group(1)
    assert latex.startswith('<span class="math inline"><math') and 'displaystyle="true"' in latex
    assert "a run costs $5 and $10 with the GPU." in page
    assert "\\frac" not in page and "\\nabla" not in page
    assert "<script" not in page  # no renderer to load: nothing but the page itself

    # the notebook going back out holds the collapsed text (Jupyter shows it the same)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    nbformat.validate(out)
    texts = [o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.outputs]
    assert "step 9\n" in texts and not any(t.count("\r") > 1 for t in texts), texts
    assert out.cells[0].source == NOTE  # maths stays LaTeX in the notebook

    # the model is shown the same, as plain text
    svc = DialogueService(db)
    try:
        d = svc.open("progress")
        q = svc.add(d.id, "prompt", "Did it install?")
        req = build(svc.open(d.id), q.id, model="local:x", output_limit=None)
    finally:
        svc.close()
    seen = "".join(t.content if isinstance(t.content, str) else
                   "".join(p.text or "" for p in t.content) for t in req.messages)
    assert "\x1b" not in seen and "\r" not in seen and "\b" not in seen
    assert seen.count("━━━━━━━ 7/7 [matplotlib]") == 1 and "6/7 [matplotlib]" not in seen
    assert seen.count("training:") == 1 and "100%" in seen and " 39/40" not in seen
    assert "step 9" in seen and "step 8" not in seen and "spinning ok" in seen
    assert "$L(\\theta)" in seen and "<math" not in seen  # the model reads the LaTeX
