"""dialogue: dialogue engineering for Python."""
from .api import Dialogue
from .document import Kind, Message
from .service import ConflictError, NotFoundError, StoreError


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dialogue")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
__all__ = ["__version__", "Dialogue", "Message", "Kind", "ConflictError", "NotFoundError", "StoreError"]
