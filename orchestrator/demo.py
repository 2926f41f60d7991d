"""The demo (``make demo``): the whole hub on embedded defaults, driven through a customer's life.

It starts the sandbox simulators (newsletter, CRM, shop, webhook receiver) and an independent SCIM server
as the app, writes a targets file for them, then runs the real processes: ``idhub serve``, ``idhub relay``,
``idhub worker`` and ``idhub beat`` on SQLite and kombu's file-system broker (or on PostgreSQL and Redis
when ``IDHUB_DATABASE_URL`` / ``IDHUB_BROKER_URL`` say so). It registers customers, changes an e-mail
address, withdraws a marketing consent, deactivates one customer and erases another; after each step it
prints what every target holds and what the ledger says, and checks it. Exit 0 when every check holds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from orchestrator import migrations
from orchestrator.auth import create_token
from orchestrator.db import engine_for, identities, outbox
from orchestrator.ledger import erasure_receipts, outbox_inflight, sync_ledger
from orchestrator.scim.schemas import CUSTOMER_SCHEMA, CustomerUser

CUSTOMER = CUSTOMER_SCHEMA
USER = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
TARGETS = ("app", "shop", "newsletter", "crm", "webhook")
APP_TOKEN = "demo-app-token"  # noqa: S105 - the local SCIM app's throwaway token
MARKETING = 'consents[purpose eq "marketing_email" and granted eq true]'


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hub:
    """A tiny SCIM client on the standard library (the core stays free of HTTP client libraries)."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - a loopback URL we built
            f"{self.base}/scim/v2{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/scim+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            raw = response.read()
        return json.loads(raw) if raw else None

    def patch(self, user_id: str, *operations: dict[str, Any]) -> Any:
        return self.call("PATCH", f"/Users/{user_id}", {"schemas": [PATCH], "Operations": list(operations)})


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback simulator
        return json.loads(response.read())


def _wait_http(url: str, deadline: float) -> None:
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()  # noqa: S310 - loopback
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.1)


@dataclass
class Customer:
    key: str
    given: str
    family: str
    email: str
    marketing: bool
    id: str = ""

    def __post_init__(self) -> None:
        self.user_name = self.email

    def resource(self) -> dict[str, Any]:
        return {
            "schemas": [USER, CUSTOMER],
            "userName": self.email,
            "name": {"givenName": self.given, "familyName": self.family},
            "emails": [{"value": self.email, "type": "home", "primary": True}],
            "active": True,
            CUSTOMER: {
                "consents": [{"purpose": "marketing_email", "granted": self.marketing, "source": "signup"}],
                "loyalty": {"tier": "bronze", "points": 0},
            },
        }


def targets_yaml(urls: Mapping[str, str], app_url: str) -> str:
    return f"""targets:
  - name: app
    connector: scim
    url: {app_url}
    token_env: DEMO_APP_TOKEN
    on_deactivate: deactivate
    on_delete: delete
  - name: shop
    connector: shop
    url: {urls["shop"]}
    token_env: DEMO_SHOP_TOKEN
    on_deactivate: deactivate
    on_delete: erase
  - name: newsletter
    connector: newsletter
    url: {urls["newsletter"]}
    token_env: DEMO_NEWSLETTER_TOKEN
    options: {{list_id: sandbox01}}
    scope: '{MARKETING}'
    on_leave_scope: deactivate
    on_deactivate: deactivate
    on_delete: erase
  - name: crm
    connector: crm
    url: {urls["crm"]}
    token_env: DEMO_CRM_TOKEN
    on_deactivate: deactivate
    on_delete: erase
  - name: webhook
    connector: webhook
    url: {urls["webhook"]}
    token_env: DEMO_WEBHOOK_SECRET
    on_delete: erase
"""


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.env: dict[str, str] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.failures: list[str] = []

    # -- the world -----------------------------------------------------------------------------------

    @contextmanager
    def world(self) -> Iterator[None]:
        from connectors.sandbox import runner
        from connectors.sandbox.scim_app import ScimApp

        with ExitStack() as stack:
            # The app is scim2-server, an independent SCIM implementation, not the sandbox's own.
            sandboxes = runner.start_sandboxes(kinds=tuple(k for k in runner.KINDS if k != "scim"))
            stack.callback(sandboxes.stop)
            extension = CustomerUser.to_schema().model_dump(mode="json", exclude_none=True)
            app = ScimApp(self.work / "app", APP_TOKEN, [extension]).start()
            stack.callback(app.stop)
            self.sandboxes, self.app = sandboxes, app
            (self.work / "targets.yaml").write_text(targets_yaml(sandboxes.urls, app.url))
            self.env = {
                **os.environ,
                "IDHUB_DATABASE_URL": os.environ.get(
                    "IDHUB_DATABASE_URL", f"sqlite:///{self.work / 'idhub.db'}"
                ),
                "IDHUB_BROKER_URL": os.environ.get(
                    "IDHUB_BROKER_URL", f"filesystem://{self.work / 'broker'}"
                ),
                "IDHUB_TARGETS_FILE": str(self.work / "targets.yaml"),
                "IDHUB_SWEEP_INTERVAL": "1",
                "IDHUB_STALE_AFTER_SECONDS": "10",
                "IDHUB_LOG_FORMAT": "json",
                "DEMO_APP_TOKEN": APP_TOKEN,
                "DEMO_SHOP_TOKEN": f"{runner.SHOP_KEY}:{runner.SHOP_SECRET}",
                "DEMO_NEWSLETTER_TOKEN": runner.NEWSLETTER_KEY,
                "DEMO_CRM_TOKEN": runner.CRM_TOKEN,
                "DEMO_WEBHOOK_SECRET": runner.WEBHOOK_SECRET,
            }
            os.environ.update({k: v for k, v in self.env.items() if k.startswith(("DEMO_", "IDHUB_"))})
            from orchestrator import settings

            settings.get.cache_clear()
            self.engine = engine_for(settings.get().database_url)
            migrations.upgrade(self.engine)
            token = create_token(self.engine, f"demo-{os.getpid()}-{int(time.time())}", ["admin"])
            port = _free_port()
            stack.callback(self.stop_processes)
            self.spawn("api", "serve", "--port", str(port))
            self.spawn("relay", "relay")
            self.spawn("worker", "worker", "--concurrency", "2", "--loglevel", "WARNING")
            self.spawn(
                "beat", "beat", "--loglevel", "WARNING", "--schedule", str(self.work / "beat-schedule")
            )
            _wait_http(f"http://127.0.0.1:{port}/readyz", time.monotonic() + 60)
            self.hub = Hub(f"http://127.0.0.1:{port}", token)
            self.connectors = self._connectors()
            yield

    def spawn(self, name: str, *argv: str) -> None:
        log = (self.work / f"{name}.log").open("wb")
        process = subprocess.Popen(  # noqa: S603 - our own command
            [sys.executable, "-m", "orchestrator.cli", *argv],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        self.processes.append(process)

    def stop_processes(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()

    def _connectors(self) -> dict[str, Any]:
        from connectors.registry import build
        from orchestrator.targets import connector_settings, load_targets

        return {
            cfg.name: build(cfg.connector, connector_settings(cfg))
            for cfg in load_targets(self.work / "targets.yaml")
        }

    # -- observing -----------------------------------------------------------------------------------

    def wait_quiet(self, timeout: float = 90) -> None:
        """Until every committed change is published, fanned out and delivered (or dead)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.engine.connect() as conn:
                unpublished = conn.execute(
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                ).scalar_one()
                inflight = conn.execute(select(func.count()).select_from(outbox_inflight)).scalar_one()
                owed = conn.execute(
                    select(func.count())
                    .select_from(sync_ledger)
                    .where(sync_ledger.c.status.in_(("pending", "retrying")))
                ).scalar_one()
            if unpublished == inflight == owed == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not quiet: {unpublished} unpublished, {inflight} in flight, {owed} owed")
            time.sleep(0.2)

    def ledger(self, customer: Customer) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(sync_ledger.c.target, sync_ledger.c.status).where(
                    sync_ledger.c.identity_id == customer.id
                )
            ).all()
        return {target: status for target, status in rows}

    def holds(self, target: str, customer: Customer) -> str:
        """A short, readable account of what ``target`` holds for ``customer``."""
        if target == "webhook":
            events = _get_json(f"{self.sandboxes.servers['webhook'].root}/_sandbox/state")["events"]
            mine = [e for e in events if (e.get("body") or {}).get("data", {}).get("id") == customer.id]
            return mine[-1]["body"]["type"] if mine else "-"
        connector = self.connectors[target]
        # The app matches on userName, which stays the sign-up address; the others match on the e-mail.
        remote_id = connector.find(customer.user_name if target == "app" else customer.email)
        held = connector.read(remote_id) if remote_id else None
        if held is None:
            return "absent"
        if target == "app":
            emails = held.get("emails") or [{}]
            email = next((e for e in emails if e.get("primary")), emails[0]).get("value")
            return f"{email} {'active' if held.get('active', True) else 'inactive'}"
        if target == "newsletter":
            return f"{held['status']} {held['email_address']}"
        if target == "crm":
            props = held["properties"]
            return f"{props.get('email')} {props.get('idhub_status') or 'active'}"
        meta = held.get("meta_data") or {}
        return f"{held.get('email')} {meta.get('idhub_status') or 'active'}"

    def table(self, title: str, customers: list[Customer]) -> dict[tuple[str, str], str]:
        seen: dict[tuple[str, str], str] = {}
        rows = [["customer", *TARGETS]]
        for c in customers:
            ledger = self.ledger(c)
            cells = [c.key]
            for target in TARGETS:
                held = self.holds(target, c)
                seen[(c.key, target)] = held
                cells.append(f"{held} [{ledger.get(target, '-')}]")
            rows.append(cells)
        widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(rows[0]))]
        print(f"\n== {title}")
        for row in rows:
            print("".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return seen

    def check(
        self,
        seen: Mapping[tuple[str, str], str],
        expected: Mapping[tuple[str, str], str],
    ) -> None:
        for key, want in expected.items():
            got = seen[key]
            if got != want:
                self.failures.append(f"{key[0]} at {key[1]}: holds {got!r}, expected {want!r}")

    # -- the story -----------------------------------------------------------------------------------

    def run(self) -> int:
        people = [
            Customer("ada", "Ada", "Lovelace", "ada@example.org", marketing=True),
            Customer("bob", "Bob", "Baker", "bob@example.org", marketing=False),
            Customer("cleo", "Cleo", "Chen", "cleo@example.org", marketing=True),
            Customer("dan", "Dan", "Diaz", "dan@example.org", marketing=True),
        ]
        ada, bob, cleo, dan = people
        with self.world():
            for c in people:
                c.id = self.hub.call("POST", "/Users", c.resource())["id"]
            self.wait_quiet()
            seen = self.table("1. four customers registered (bob declined marketing e-mail)", people)
            expected: dict[tuple[str, str], str] = {}
            for c in people:
                expected[(c.key, "app")] = f"{c.email} active"
                expected[(c.key, "crm")] = f"{c.email} active"
                expected[(c.key, "shop")] = f"{c.email} active"
                expected[(c.key, "webhook")] = "customer.upserted"
                expected[(c.key, "newsletter")] = f"subscribed {c.email}" if c.marketing else "absent"
            self.check(seen, expected)

            new_email = "ada.lovelace@example.org"
            self.hub.patch(
                ada.id,
                {
                    "op": "replace",
                    "path": "emails",
                    "value": [{"value": new_email, "type": "home", "primary": True}],
                },
            )
            old_email, ada.email = ada.email, new_email
            self.wait_quiet()
            seen = self.table("2. ada changed her e-mail address", people)
            self.check(
                seen,
                {
                    ("ada", "crm"): f"{new_email} active",
                    ("ada", "shop"): f"{new_email} active",
                    ("ada", "newsletter"): f"subscribed {new_email}",
                    ("ada", "app"): f"{new_email} active",
                },
            )
            ada.email = old_email
            old_news = self.holds("newsletter", ada)
            ada.email = new_email
            if old_news != "absent":
                self.failures.append(f"the newsletter still holds ada's old address ({old_news})")

            self.hub.patch(
                cleo.id,
                {
                    "op": "replace",
                    "path": f'{CUSTOMER}:consents[purpose eq "marketing_email"].granted',
                    "value": False,
                },
            )
            self.wait_quiet()
            seen = self.table("3. cleo withdrew her marketing consent", people)
            self.check(
                seen,
                {
                    ("cleo", "newsletter"): f"unsubscribed {cleo.email}",
                    ("cleo", "crm"): f"{cleo.email} active",
                },
            )

            self.hub.patch(bob.id, {"op": "replace", "path": "active", "value": False})
            self.wait_quiet()
            seen = self.table("4. bob's account was deactivated", people)
            self.check(
                seen,
                {
                    ("bob", "app"): f"{bob.email} inactive",
                    ("bob", "crm"): f"{bob.email} deactivated",
                    ("bob", "shop"): f"{bob.email} deactivated",
                    ("bob", "webhook"): "customer.deactivated",
                    ("bob", "newsletter"): "absent",
                },
            )

            self.hub.call("DELETE", f"/Users/{dan.id}")
            self.wait_quiet()
            seen = self.table("5. dan asked to be forgotten (GDPR Art. 17)", people)
            self.check(seen, {("dan", t): "absent" for t in ("app", "shop", "newsletter", "crm")})
            self.check(seen, {("dan", "webhook"): "customer.erased"})
            self.erasure_report(dan)
        print()
        if self.failures:
            for failure in self.failures:
                print(f"FAIL {failure}")
            return 1
        print("OK: every target holds what the hub says it should.")
        return 0

    def erasure_report(self, customer: Customer) -> None:
        with self.engine.connect() as conn:
            receipts = conn.execute(
                select(
                    erasure_receipts.c.target, erasure_receipts.c.action, erasure_receipts.c.outcome
                ).where(erasure_receipts.c.identity_id == customer.id)
            ).all()
            left = conn.execute(select(identities.c.id).where(identities.c.id == customer.id)).first()
        print("   erasure receipt: " + ", ".join(f"{t}={a}:{o}" for t, a, o in sorted(receipts)))
        done = {t for t, _, _ in receipts}
        missing = [t for t in TARGETS if t not in done]
        if missing:
            self.failures.append(f"no erasure receipt for {', '.join(missing)}")
        if left is not None:
            self.failures.append("the hub still holds dan's tombstone after every target confirmed")


def main() -> int:
    work = Path("build/demo").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return Demo(work).run()
    except RuntimeError as exc:
        print(f"demo: {exc}; see the logs in {work}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
