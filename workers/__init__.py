"""Celery workers: thin tasks that take ids, call plain functions in ``orchestrator``, and ack or retry.

``celery -A workers worker`` finds ``app`` here.
"""

from workers.app import app

__all__ = ["app"]
