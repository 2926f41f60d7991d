"""The only errors a connector raises. Connectors translate every httpx error into one of these.

SyncError                  base; ``code`` is a short machine-readable reason, ``message`` holds no PII
├── RetryableError         the target may accept the same request later (timeout, connection, 5xx, 429)
├── PermanentError         this record will not be accepted as it is (4xx validation); dead-letter it
│   └── TargetDisabledError  the target refuses all further deliveries (webhook 410); stop the target
├── ConflictError          an account with the matching key already exists; ``remote_id`` names it
└── GoneError              the remote account is not there any more (404 on update or delete)
"""

from __future__ import annotations


class SyncError(Exception):
    """A delivery to a target failed; ``code`` and ``message`` carry identifiers only, never personal data."""

    code: str = "error"

    def __init__(self, message: str = "", *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code


class RetryableError(SyncError):
    """Try the same request again later; ``retry_after`` (seconds) is the target's hint, if it gave one."""

    code = "retryable"

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class PermanentError(SyncError):
    """The target rejects this record as it is; retrying the same payload cannot succeed."""

    code = "permanent"


class TargetDisabledError(PermanentError):
    """The target asks never to be called again (e.g. a webhook answering 410 Gone)."""

    code = "target_disabled"


class ConflictError(SyncError):
    """An account with the record's matching key exists; adopt ``remote_id`` instead of creating another."""

    code = "conflict"

    def __init__(self, message: str = "", *, remote_id: str | None = None, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.remote_id = remote_id


class GoneError(SyncError):
    """The remote account the ledger names does not exist at the target any more."""

    code = "gone"
