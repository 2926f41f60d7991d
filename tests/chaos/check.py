"""After the faults: the hub against the driver's model, then every target against the hub.

Per target and customer, the customer's current SCIM document goes through the target's mapping
(``compile_mapping``) and the target's policy (``decide``); the account the target lists for it (by the hub id
it stores, else by its matching key) must then hold every mapped attribute, be switched on when it should be,
and be switched off or absent when it should not be held. Everything is counted by hub id; examples carry ids
and field names only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import Engine, select

from connectors.base import Connector, RemoteAccount
from orchestrator import gdpr
from orchestrator.db import group_members, groups, identities
from orchestrator.ledger import DONE, dead_letters, sync_ledger
from orchestrator.mapping import compile_mapping, match_key
from orchestrator.scim.schemas import CUSTOMER_SCHEMA
from orchestrator.targets import DeprovisionPolicy, TargetConfig, decide
from tests.chaos.workload import Workload

L = sync_ledger.c
EXAMPLES = 5


@dataclass
class Findings:
    """What the comparison found; every list holds (target, identity id, detail) examples."""

    lost: list[tuple[str, str, str]] = field(default_factory=list)
    stale: list[tuple[str, str, str]] = field(default_factory=list)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)
    hub_mismatch: list[tuple[str, str, str]] = field(default_factory=list)
    erasure_open: list[tuple[str, str, str]] = field(default_factory=list)
    erasures_requested: int = 0
    erasures_confirmed: int = 0
    dead_expected: set[tuple[str, str]] = field(default_factory=set)
    dead_found: set[tuple[str, str]] = field(default_factory=set)
    accounts: dict[str, int] = field(default_factory=dict)
    ledger_behind: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.stale
            or self.duplicates
            or self.hub_mismatch
            or self.erasure_open
            or self.dead_found != self.dead_expected
            or self.erasures_confirmed != self.erasures_requested
        )

    def as_dict(self) -> dict[str, Any]:
        def summary(items: list[tuple[str, str, str]]) -> dict[str, Any]:
            by_target: dict[str, int] = defaultdict(int)
            for target, _, _ in items:
                by_target[target] += 1
            return {
                "count": len(items),
                "by_target": dict(sorted(by_target.items())),
                "examples": [list(i) for i in items[:EXAMPLES]],
            }

        return {
            "lost": summary(self.lost),
            "stale": summary(self.stale),
            "duplicate_remote_accounts": summary(self.duplicates),
            "hub_differs_from_what_was_sent": summary(self.hub_mismatch),
            "dead_letters": {
                "expected": len(self.dead_expected),
                "found": len(self.dead_found),
                "unexpected": sorted(map(list, self.dead_found - self.dead_expected))[:EXAMPLES],
                "missing": sorted(map(list, self.dead_expected - self.dead_found))[:EXAMPLES],
            },
            "erasures": {
                "requested": self.erasures_requested,
                "confirmed": self.erasures_confirmed,
                "open": summary(self.erasure_open),
            },
            "accounts_at_targets": self.accounts,
            "ledger_rows_behind_hub": self.ledger_behind,
        }


# -- the hub against the model ----------------------------------------------------------------------------


def _primary(items: Any) -> Any:
    for item in items or ():
        if item.get("primary"):
            return item.get("value")
    return None


def _marketing(doc: Mapping[str, Any]) -> bool:
    for consent in (doc.get(CUSTOMER_SCHEMA) or {}).get("consents") or ():
        if consent.get("purpose") == "marketing_email":
            return bool(consent.get("granted"))
    return False


def check_hub(engine: Engine, workload: Workload, found: Findings) -> dict[str, Any]:
    """Every change the hub acknowledged is in the hub; returns the hub's live users by id."""
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(identities))}
    users: dict[str, Any] = {}
    for person in workload.people:
        if person.id is None:
            found.hub_mismatch.append(("hub", f"#{person.n}", "acknowledged create without an id"))
            continue
        row = rows.get(person.id)
        if person.erased:
            if row is not None:
                found.hub_mismatch.append(("hub", person.id, "erased customer still in the hub"))
            continue
        if row is None or row.deleted_at is not None:
            found.hub_mismatch.append(("hub", person.id, "customer missing from the hub"))
            continue
        doc = row.doc
        got = {
            "email": _primary(doc.get("emails")),
            "given": (doc.get("name") or {}).get("givenName"),
            "family": (doc.get("name") or {}).get("familyName"),
            "phone": _primary(doc.get("phoneNumbers")),
            "marketing": _marketing(doc),
            "active": doc.get("active", True),
        }
        want = {k: getattr(person, k) for k in got}
        wrong = sorted(k for k in got if got[k] != want[k])
        if wrong:
            found.hub_mismatch.append(("hub", person.id, ",".join(wrong)))
        users[person.id] = row
    return users


# -- the targets against the hub --------------------------------------------------------------------------


def held(kind: str, account: RemoteAccount) -> bool:
    """Whether the target counts the account as existing (a newsletter keeps archived members)."""
    return not (kind == "newsletter" and account.attributes.get("status") == "archived")


def switched_on(kind: str, attributes: Mapping[str, Any]) -> bool:
    """Whether an account is active at its target, in that target's own terms."""
    if kind == "scim":
        return attributes.get("active", True) is not False
    if kind == "shop":
        return (attributes.get("meta_data") or {}).get("idhub_status", "active") == "active"
    if kind == "crm":
        return (attributes.get("properties") or {}).get("idhub_status", "active") == "active"
    if kind == "newsletter":
        return attributes.get("status") == "subscribed"
    raise ValueError(kind)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and not prefix.startswith("urn:"):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _norm(value: Any, fold: bool) -> Any:
    """A value as compared: None and "" alike, text trimmed, the matching key case-folded, lists and
    objects by their JSON with None dropped."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = value.strip()
        return value.casefold() if fold else value
    if isinstance(value, list | dict):
        return json.dumps(_strip(value), sort_keys=True)
    return value


def _strip(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value if v is not None]
    return value


def differing(payload: Mapping[str, Any], remote: Mapping[str, Any], key_field: str) -> list[str]:
    """The mapped attribute paths whose value at the target is not the hub's."""
    ours, theirs = _flat(payload), _flat(remote)
    return sorted(p for p in ours if _norm(ours[p], p == key_field) != _norm(theirs.get(p), p == key_field))


def check_target(
    cfg: TargetConfig,
    connector: Connector,
    users: Mapping[str, Any],
    workload: Workload,
    found: Findings,
) -> None:
    """One target against the hub: lost, stale and duplicate accounts; erased customers gone."""
    kind = cfg.connector
    mapper = compile_mapping(cfg.mapping or connector.default_mapping)
    key_field = connector.match_field
    by_external: dict[str, list[RemoteAccount]] = defaultdict(list)
    by_key: dict[str, list[RemoteAccount]] = defaultdict(list)
    total = 0
    for page in connector.pages():
        for account in page.accounts:
            if not held(kind, account):
                continue
            total += 1
            if account.external_id:
                by_external[account.external_id].append(account)
            if account.match_key:
                by_key[account.match_key.casefold()].append(account)
    found.accounts[cfg.name] = total
    for ext, accounts in sorted(by_external.items()):
        if len(accounts) > 1:
            found.duplicates.append((cfg.name, ext, f"{len(accounts)} accounts store this hub id"))
    for accounts in by_key.values():
        ids = {a.external_id for a in accounts}
        if len(accounts) > 1:
            found.duplicates.append((cfg.name, ",".join(sorted(map(str, ids))), "one matching key twice"))
    for ident, row in users.items():
        if (cfg.name, ident) in found.dead_expected:
            continue
        payload = mapper(row.doc)
        key = match_key(payload, key_field)
        accounts = by_external.get(ident) or (by_key.get(key.casefold(), []) if key else [])
        account = accounts[0] if accounts else None
        action = decide(cfg, row.doc, deleted=False, previously_provisioned=True).action
        if action == "upsert":
            if account is None:
                found.lost.append((cfg.name, ident, "no account"))
                continue
            if not switched_on(kind, account.attributes):
                found.lost.append((cfg.name, ident, "account switched off"))
            fields = differing(payload, account.attributes, key_field)
            if fields:
                found.stale.append((cfg.name, ident, ",".join(fields)))
        elif account is not None and switched_on(kind, account.attributes):
            where = (
                "its current key"
                if key and (account.match_key or "").casefold() == key.casefold()
                else "an old key"
            )
            found.lost.append((cfg.name, ident, f"should be {action}: still switched on, under {where}"))
    if cfg.on_delete in (DeprovisionPolicy.DELETE, DeprovisionPolicy.ERASE):
        for person in workload.people:
            if person.erased and person.id is not None:
                left = by_external.get(person.id) or by_key.get(person.email.casefold())
                if left:
                    found.erasure_open.append((cfg.name, person.id, "account still at the target"))


def check_groups(cfg: TargetConfig, app_url: str, token: str, engine: Engine, found: Findings) -> None:
    """The app's groups against the hub's: one per live hub group, its name and members (by hub id)."""
    headers = {"Authorization": f"Bearer {token}"}
    remote_groups: list[dict[str, Any]] = []
    users: dict[str, str] = {}
    with httpx.Client(base_url=app_url, headers=headers, timeout=120) as client:
        for endpoint, sink in (("Groups", remote_groups), ("Users", None)):
            start = 1
            while True:
                doc = (
                    client.get(endpoint, params={"startIndex": start, "count": 500}).raise_for_status().json()
                )
                resources = doc.get("Resources") or []
                for r in resources:
                    if sink is not None:
                        sink.append(r)
                    else:
                        users[str(r["id"])] = str(r.get("externalId"))
                start += len(resources)
                if not resources or start > int(doc.get("totalResults", 0)):
                    break
    with engine.connect() as conn:
        hub = {r.id: r for r in conn.execute(select(groups))}
        members: dict[str, set[str]] = defaultdict(set)
        for m in conn.execute(select(group_members.c.group_id, group_members.c.member_id)):
            members[m.group_id].add(m.member_id)
    by_external: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in remote_groups:
        by_external[str(g.get("externalId"))].append(g)
    for ext, found_groups in by_external.items():
        if len(found_groups) > 1:
            found.duplicates.append((cfg.name, ext, f"{len(found_groups)} groups store this hub id"))
    for gid, row in hub.items():
        remote = (by_external.get(gid) or [None])[0]
        if row.deleted_at is not None:
            if remote is not None:
                found.lost.append((cfg.name, gid, "deleted group still at the target"))
            continue
        if remote is None:
            found.lost.append((cfg.name, gid, "no group"))
            continue
        wrong = []
        if remote.get("displayName") != row.display_name:
            wrong.append("displayName")
        # Members the app holds no account for (never provisioned there) cannot be in its groups.
        expected = members[gid] & set(users.values())
        held_members = {users.get(str(m.get("value"))) for m in remote.get("members") or ()}
        if held_members != expected:
            missing, extra = len(expected - held_members), len(held_members - expected)
            wrong.append(f"members (missing {missing}, extra {extra})")
        if wrong:
            found.stale.append((cfg.name, gid, ",".join(wrong)))


def check_erasures(engine: Engine, workload: Workload, found: Findings) -> None:
    """Every erasure's receipt is complete: the hub purged the tombstone and no target is pending."""
    for person in workload.people:
        if not person.erased or person.id is None:
            continue
        found.erasures_requested += 1
        try:
            receipt = gdpr.receipt(engine, person.id)
        except LookupError:
            found.erasure_open.append(("hub", person.id, "no receipt"))
            continue
        pending = [t["target"] for t in receipt["targets"] if t["outcome"] == gdpr.PENDING]
        if receipt["status"] != "complete" or pending:
            found.erasure_open.append(("hub", person.id, f"receipt {receipt['status']} {pending}"))
            continue
        if not any(o[1] == person.id for o in found.erasure_open):
            found.erasures_confirmed += 1


def check_ledger(engine: Engine, found: Findings) -> None:
    """Dead letters (not replayed) by target and hub id; ledger rows whose synced version trails the hub."""
    with engine.connect() as conn:
        found.dead_found = {
            (r.target, r.identity_id)
            for r in conn.execute(
                select(dead_letters.c.target, dead_letters.c.identity_id).where(
                    dead_letters.c.replayed_at.is_(None)
                )
            )
        }
        versions = {r.id: r.version for r in conn.execute(select(identities.c.id, identities.c.version))}
        done = {s.value for s in DONE}
        for r in conn.execute(select(L.identity_id, L.status, L.synced_version, L.resource_type)):
            if r.resource_type != "User" or r.status not in done:
                continue
            if r.synced_version is None or r.synced_version < versions.get(r.identity_id, 0):
                found.ledger_behind += 1


def verify(
    engine: Engine,
    targets: list[TargetConfig],
    connectors: Mapping[str, Connector],
    workload: Workload,
    dead_expected: set[tuple[str, str]],
    app: tuple[str, str],
) -> Findings:
    """The whole comparison; ``app`` is the SCIM app's (url, token) for its groups."""
    found = Findings(dead_expected=set(dead_expected))
    users = check_hub(engine, workload, found)
    for cfg in targets:
        check_target(cfg, connectors[cfg.name], users, workload, found)
        if cfg.groups:
            check_groups(cfg, app[0], app[1], engine, found)
    check_erasures(engine, workload, found)
    check_ledger(engine, found)
    return found
