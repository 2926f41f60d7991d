"""Bearer tokens with scopes. Only a SHA-256 of each token is stored; the token is shown once."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update

from orchestrator.db import api_tokens, now

SCOPES = frozenset({"scim:read", "scim:write", "admin", "metrics"})
PREFIX = "idh_"


class TokenError(ValueError):
    """A token command was given a bad name or scope; the message is one line."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, as far as the API needs to know: a token's id, name and scopes."""

    token_id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        # admin holds every right; scim:write implies reading what one writes.
        return (
            "admin" in self.scopes
            or scope in self.scopes
            or (scope == "scim:read" and "scim:write" in self.scopes)
        )


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, name: str, scopes: list[str]) -> str:
    """Store a new token's hash and return the token itself, which is never stored."""
    unknown = sorted(set(scopes) - SCOPES)
    if unknown:
        raise TokenError(f"unknown scope {unknown[0]!r}; known: {', '.join(sorted(SCOPES))}")
    if not scopes:
        raise TokenError("give at least one --scope")
    if not name or len(name) > 128:
        raise TokenError("a token name has 1 to 128 characters")
    token = PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        if conn.execute(select(api_tokens.c.id).where(api_tokens.c.name == name)).first():
            raise TokenError(f"a token named {name!r} exists already")
        conn.execute(
            insert(api_tokens).values(
                id=str(uuid.uuid4()),
                name=name,
                token_hash=digest(token),
                scopes=" ".join(sorted(set(scopes))),
                created_at=now(),
            )
        )
    return token


def list_tokens(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(select(api_tokens).order_by(api_tokens.c.created_at)).all()
    return [
        {
            "name": r.name,
            "scopes": r.scopes.split(),
            "created": r.created_at.isoformat() if r.created_at else None,
            "revoked": r.revoked_at.isoformat() if r.revoked_at else None,
        }
        for r in rows
    ]


def revoke_token(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        result = conn.execute(
            update(api_tokens)
            .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=now())
        )
    if result.rowcount == 0:
        raise TokenError(f"no active token named {name!r}")


class TokenVerifier:
    """Checks bearer tokens against the store, caching answers briefly so a request costs no query."""

    def __init__(self, engine: Engine, ttl: float = 2.0) -> None:
        self.engine = engine
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def verify(self, token: str | None) -> Principal | None:
        if not token or not token.startswith(PREFIX) or len(token) > 256:
            return None
        key = digest(token)
        stamp = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and stamp - hit[0] < self.ttl:
            return hit[1]
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    api_tokens.c.id, api_tokens.c.name, api_tokens.c.token_hash, api_tokens.c.scopes
                ).where(api_tokens.c.token_hash == key, api_tokens.c.revoked_at.is_(None))
            ).first()
        principal = None
        # The lookup is by hash; compare again in constant time so no early exit depends on the secret.
        if row is not None and hmac.compare_digest(row.token_hash, key):
            principal = Principal(row.id, row.name, frozenset(row.scopes.split()))
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (stamp, principal)
        return principal
