"""Start the four simulators in this process (background threads, loopback) and stop them again."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.base import ConnectorSettings
from connectors.sandbox.core import SandboxServer, Simulator
from connectors.sandbox.crm import CrmSimulator
from connectors.sandbox.newsletter import NewsletterSimulator
from connectors.sandbox.scim import ScimSimulator
from connectors.sandbox.shop import ShopSimulator
from connectors.sandbox.webhook import WebhookSimulator

KINDS = ("newsletter", "crm", "shop", "webhook", "scim")
# Credentials the sandbox accepts: fixed test values, never real keys.
# ruff: noqa: S105
NEWSLETTER_KEY = "sandbox-newsletter-key"
NEWSLETTER_LIST = "sandbox01"
CRM_TOKEN = "sandbox-crm-token"
SHOP_KEY, SHOP_SECRET = "ck_sandbox", "cs_sandbox"
SCIM_TOKEN = "sandbox-scim-token"
WEBHOOK_SECRET = "whsec_c2FuZGJveC13ZWJob29rLXNpZ25pbmctc2VjcmV0"


def build_simulator(kind: str, *, seed: int = 0, **kwargs: Any) -> Simulator:
    """A simulator of ``kind`` with the sandbox credentials (``kwargs``: fault knobs and target options)."""
    if kind == "newsletter":
        return NewsletterSimulator(api_key=NEWSLETTER_KEY, list_ids=(NEWSLETTER_LIST,), seed=seed, **kwargs)
    if kind == "crm":
        return CrmSimulator(token=CRM_TOKEN, seed=seed, **kwargs)
    if kind == "shop":
        return ShopSimulator(key=SHOP_KEY, secret=SHOP_SECRET, seed=seed, **kwargs)
    if kind == "webhook":
        return WebhookSimulator(secret=WEBHOOK_SECRET, seed=seed, **kwargs)
    if kind == "scim":
        return ScimSimulator(token=SCIM_TOKEN, seed=seed, **kwargs)
    raise ValueError(f"unknown sandbox kind {kind!r}; known: {', '.join(KINDS)}")


def connector_settings(kind: str, url: str, **overrides: Any) -> ConnectorSettings:
    """The ConnectorSettings that reach the sandbox of ``kind`` at ``url`` with its credentials."""
    token, options = {
        "newsletter": (NEWSLETTER_KEY, {"list_id": NEWSLETTER_LIST}),
        "crm": (CRM_TOKEN, {}),
        "shop": (f"{SHOP_KEY}:{SHOP_SECRET}", {}),
        "webhook": (WEBHOOK_SECRET, {}),
        "scim": (SCIM_TOKEN, {}),
    }[kind]
    values: dict[str, Any] = {"name": f"sandbox-{kind}", "url": url, "token": token, "options": options}
    values.update(overrides)
    return ConnectorSettings(**values)


@dataclass
class Sandboxes:
    """Running simulators by kind."""

    servers: dict[str, SandboxServer] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        """Each kind's base URL, as a connector is configured with it."""
        return {kind: server.url for kind, server in self.servers.items()}

    def settings(self, kind: str, **overrides: Any) -> ConnectorSettings:
        return connector_settings(kind, self.servers[kind].url, **overrides)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def start_sandboxes(
    ports: Mapping[str, int] | None = None,
    *,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
    host: str = "127.0.0.1",
) -> Sandboxes:
    """Start the simulators of ``kinds`` on the given ports (else free ones); ``stop()`` stops them."""
    running = Sandboxes()
    try:
        for kind in kinds:
            sim = build_simulator(kind, seed=seed)
            port = (ports or {}).get(kind, 0)
            running.servers[kind] = SandboxServer(sim, host=host, port=port).start()
    except BaseException:
        running.stop()
        raise
    return running


def serve(ports: Mapping[str, int] | None = None, *, seed: int = 0, host: str = "127.0.0.1") -> int:
    """Start every simulator, print one ``kind url`` line each, and serve until interrupted."""
    sandboxes = start_sandboxes(ports, seed=seed, host=host)
    for kind, url in sandboxes.urls.items():
        print(f"{kind} {url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sandboxes.stop()
    return 0


def cli_main(args: argparse.Namespace) -> int:
    """``idhub sandbox``: ``serve`` with the namespace's ``host``, ``seed`` and ``ports`` when it has them."""
    return serve(
        getattr(args, "ports", None), seed=getattr(args, "seed", 0), host=getattr(args, "host", "127.0.0.1")
    )
