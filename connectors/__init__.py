"""Connectors: every target's API behind one small interface (``connectors.base.Connector``).

Nothing here imports ``orchestrator`` or ``workers``; nothing above here sees httpx.
"""

from connectors.base import Connector, DeprovisionAction, Page, Record, RemoteAccount, Result
from connectors.errors import (
    ConflictError,
    GoneError,
    PermanentError,
    RetryableError,
    SyncError,
    TargetDisabledError,
)

__all__ = [
    "ConflictError",
    "Connector",
    "DeprovisionAction",
    "GoneError",
    "Page",
    "PermanentError",
    "Record",
    "RemoteAccount",
    "Result",
    "RetryableError",
    "SyncError",
    "TargetDisabledError",
]
