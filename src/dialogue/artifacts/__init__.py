"""Artifacts: what a dialogue becomes outside the app (a notebook, a module, a post).

Pure conversions over `dialogue.document` objects; the CLI and the web app do the I/O around
them (except the small `write_*` helpers, which write exactly the files they are asked to)."""
from dialogue.artifacts.html import to_html
from dialogue.artifacts.ipynb import (DEFAULT_MAX_BYTES, NotebookError, NotebookTooLarge,
                                      NotebookVersionError, read_notebook, to_ipynb_bytes,
                                      write_notebook)
from dialogue.artifacts.markdown import (MarkdownExport, hidden_left_out, to_markdown,
                                         write_markdown)
from dialogue.artifacts.module import ModuleExportError, to_module

__all__ = ["read_notebook", "write_notebook", "to_ipynb_bytes", "NotebookError",
           "NotebookTooLarge", "NotebookVersionError", "DEFAULT_MAX_BYTES", "to_module",
           "ModuleExportError", "to_markdown", "write_markdown", "MarkdownExport", "to_html",
           "hidden_left_out"]
