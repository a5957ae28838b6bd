"""Regenerate generated.ipynb: a notebook executed in a real ipykernel, with the outputs the
artifact tests need in one small file (a PNG and an SVG display, an HTML output carrying script
and event handlers, markdown output, stdout and stderr, an error with IPython's coloured
traceback, a markdown cell with an image attachment, a raw cell, nbdev export directives).

Run it with the project venv: `.venv/bin/python tests/data/notebooks/generate.py`. It uses
jupyter_client directly (not dialogue.kernel) so the test data does not depend on the code under
test.
"""
from __future__ import annotations

import base64
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager


def png(w: int = 24, h: int = 16) -> bytes:
    """A small gradient PNG, written by hand so the data needs no imaging library."""
    raw = b"".join(b"\x00" + b"".join(bytes((x * 10 % 256, y * 15 % 256, 128)) for x in range(w))
                   for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


CELLS = [
    ("raw", "---\ntitle: Generated test notebook\nauthor: dialogue tests\n---"),
    ("markdown",
     "# A generated notebook\n\nAn attached image: ![gradient](attachment:gradient.png)"),
    ("code", "#| export\ndef double(x: int) -> int:\n    \"Twice x.\"\n    return 2 * x"),
    ("code", "import sys\nprint('to stdout', double(21))\nprint('to stderr', file=sys.stderr)"),
    ("code", "import base64\nfrom IPython.display import Image, display\n"
             f"display(Image(data=base64.b64decode({base64.b64encode(png()).decode()!r})))"),
    ("code", "from IPython.display import SVG\n"
             "SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"40\" height=\"20\">"
             "<rect width=\"40\" height=\"20\" fill=\"teal\"/></svg>')"),
    ("code", "from IPython.display import HTML\n"
             "HTML('<table class=\"dataframe\"><tr><th>x</th><th>double</th></tr>'\n"
             "     '<tr><td>1</td><td>2</td></tr></table>'\n"
             "     '<script>window.__xss = 1</script><img src=x onerror=\"window.__xss=2\">')"),
    ("code", "from IPython.display import Markdown\nMarkdown('**bold** output with `code`')"),
    ("code", "1 / 0"),
    ("code", "#| exports\nGREETING = 'hello'\n\ndef greet(name: str) -> str:\n"
             "    return f'{GREETING}, {name}'"),
    ("markdown", "The end."),
]


def run(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    with tempfile.TemporaryDirectory() as d:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(d) / "kernel"))
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        try:
            info = kc.kernel_info(reply=True)["content"]["language_info"]
            nb = nbformat.v4.new_notebook(metadata={
                "kernelspec": {"display_name": "Python 3", "language": "python",
                               "name": "python3"},
                "language_info": {"name": info["name"], "version": info["version"]}})
            for kind, src in cells:
                if kind == "raw":
                    nb.cells.append(nbformat.v4.new_raw_cell(src))
                    continue
                if kind == "markdown":
                    cell = nbformat.v4.new_markdown_cell(src)
                    if "attachment:gradient.png" in src:
                        cell.attachments = {"gradient.png": {
                            "image/png": base64.b64encode(png(8, 8)).decode()}}
                    nb.cells.append(cell)
                    continue
                cell = nbformat.v4.new_code_cell(src)
                outputs: list = []
                reply = kc.execute_interactive(
                    src, timeout=60, output_hook=lambda m, out=outputs: _collect(m, out))
                cell.outputs = [nbformat.v4.output_from_msg(m) for m in outputs]
                cell.execution_count = reply["content"].get("execution_count")
                nb.cells.append(cell)
            return nb
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def _collect(msg: dict, outputs: list) -> None:
    if msg["msg_type"] in ("stream", "display_data", "execute_result", "error"):
        outputs.append(msg)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("generated.ipynb")
    nb = run(CELLS)
    nbformat.validate(nb)
    nbformat.write(nb, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
