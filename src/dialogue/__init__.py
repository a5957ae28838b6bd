"""dialogue: dialogue engineering for Python."""
from .api import Dialogue
from .document import Kind, Message
from .service import ConflictError, NotFoundError, StoreError

__version__ = "0.1.0"
__all__ = ["Dialogue", "Message", "Kind", "ConflictError", "NotFoundError", "StoreError"]
