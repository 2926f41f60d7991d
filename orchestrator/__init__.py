"""idhub's domain core: the SCIM hub, the identity store, the outbox, the ledger and the sync decisions.

Nothing here imports Celery, kombu or an HTTP client; ruff's banned-api rule enforces it.
"""
