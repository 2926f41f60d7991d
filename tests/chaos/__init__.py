"""The chaos run: real PostgreSQL, Redis, Celery and four targets under faults; then every target is compared
with the hub. ``python -m tests.chaos --changes N`` (``make chaos``); a small size runs in ``make test``."""
