"""``idhub`` sub-commands: see register()."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's sub-commands to the ``idhub`` parser's sub-parsers."""
    del sub


__all__ = ["argparse", "register"]
