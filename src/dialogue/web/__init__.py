"""The browser surface: FastHTML + HTMX over the dialogue service (see `app`)."""
from .app import create_app, serve

__all__ = ["create_app", "serve"]
