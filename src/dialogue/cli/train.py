"""`dialogue train ...`: the trainer parses its own arguments (`dialogue train --help` shows its
options); it reads the dialogues it trains on through the service."""
from __future__ import annotations

import argparse

from ..service import DialogueService


def cmd_train(svc: DialogueService, a: argparse.Namespace) -> int:
    return svc.train(a.args)


def _args_train(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("args", nargs=argparse.REMAINDER)


COMMANDS = {
    "train": (cmd_train, "fine-tune a LoRA/DoRA adapter (see `dialogue train -- --help`)",
              _args_train),
}
