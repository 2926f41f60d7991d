"""Fixtures of the monitoring tests: logging configured into a buffer, restored afterwards."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from orchestrator import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger, the quieted library loggers and structlog back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ["sqlalchemy", "httpx", "httpcore", "alembic", "uvicorn", "uvicorn.error", "uvicorn.access"]
    names += ["_granian", "granian.access"]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters), lg.propagate) for lg in loggers]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for logger, lvl, own, filters, propagate in saved:
        logger.setLevel(lvl)
        logger.handlers[:] = own
        logger.filters[:] = filters
        logger.propagate = propagate
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logging.captureWarnings(False)


@pytest.fixture
def json_log(restore_logging: None) -> Callable[[], list[dict[str, Any]]]:
    """Logging configured in JSON mode into a buffer; call the fixture's value to read the lines so far."""
    buffer = io.StringIO()
    logs.configure("json", "DEBUG", stream=buffer)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]

    lines.buffer = buffer  # type: ignore[attr-defined]
    return lines
