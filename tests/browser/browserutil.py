"""Helpers shared by the browser tests."""
from __future__ import annotations

from dialogue.service import DialogueService


def stored(server, did: str):
    """The dialogue as the test server's database holds it (read through a service of our own)."""
    svc = DialogueService(server.db)
    try:
        return svc.open(did)
    finally:
        svc.close()
