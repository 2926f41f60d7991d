"""The customer changes a chaos run sends, and the driver that sends them through the hub's SCIM Bulk API.

``Workload`` draws changes from a seeded RNG and keeps its own model of what every customer and group should
be; the verification compares the hub with that model before it compares the targets with the hub. A Bulk
request holds at most one change per resource; a request the hub did not answer (PostgreSQL restarting) is
sent again, its creates first looked up so that a create that did commit is not made twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from orchestrator.scim.schemas import CUSTOMER_SCHEMA
from tests.hub import GROUP_SCHEMA, SCIM, USER_SCHEMA

BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
CONSENT = f'{CUSTOMER_SCHEMA}:consents[purpose eq "marketing_email"].granted'
DOMAIN = "chaos.example"
# How often each kind of change is drawn once there are customers to change.
WEIGHTS = {
    "create": 22,
    "rename": 18,
    "email": 10,
    "phone": 6,
    "consent": 15,
    "deactivate": 5,
    "reactivate": 4,
    "erase": 5,
    "group": 15,
}


@dataclass
class Person:
    n: int
    email: str
    given: str
    family: str
    phone: str
    marketing: bool
    active: bool = True
    erased: bool = False
    bad: bool = False  # its e-mail is one a target refuses for good: never changed after its creation
    id: str | None = None
    busy: bool = False  # a change of it is in the request being sent


@dataclass
class Group:
    n: int
    name: str
    members: set[int] = field(default_factory=set)
    deleted: bool = False
    id: str | None = None
    busy: bool = False


@dataclass
class Op:
    """One Bulk operation and what it changes in the model."""

    kind: str
    method: str
    path: str
    data: dict[str, Any] | None
    person: Person | None = None
    group: Group | None = None


class Workload:
    """Seeded changes over a model of customers and groups."""

    def __init__(self, seed: int, run: str, bad: int) -> None:
        self.rng = random.Random(seed)
        self.run = run
        self.people: list[Person] = []
        self.groups: list[Group] = []
        # Customers a target will refuse for good (its ``reject_keys``), known before the run starts.
        self.bad_emails = [f"bad{i}-{run}@{DOMAIN}" for i in range(bad)]
        self.counter = 0

    # -- the model ----------------------------------------------------------------------------------------

    def _email(self, n: int) -> str:
        self.counter += 1
        return f"c{n}-{self.counter}-{self.run}@{DOMAIN}"

    def _name(self) -> str:
        self.counter += 1
        return f"N{self.counter}"

    def _live(self) -> list[Person]:
        return [p for p in self.people if p.id and not p.erased and not p.bad and not p.busy]

    # -- drawing changes ----------------------------------------------------------------------------------

    def draw(self, count: int) -> list[Op]:
        """Up to ``count`` changes, at most one per customer or group, applied to the model now."""
        ops: list[Op] = []
        for _ in range(count * 3):
            if len(ops) >= count:
                break
            op = self._one()
            if op is not None:
                ops.append(op)
                for thing in (op.person, op.group):
                    if thing is not None:
                        thing.busy = True
        return ops

    def _one(self) -> Op | None:
        live = self._live()
        made_bad = sum(p.bad for p in self.people)
        if made_bad < len(self.bad_emails) and len(self.people) >= 5 * (made_bad + 1):
            return self._create(bad=True)
        if len(live) < 10:
            return self._create()
        kind = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        if kind == "create":
            return self._create()
        if kind == "group":
            return self._group(live)
        person = self.rng.choice(live)
        if kind == "rename":
            person.given, person.family = self._name(), self._name()
            ops = [_replace("name.givenName", person.given), _replace("name.familyName", person.family)]
        elif kind == "email":
            person.email = self._email(person.n)
            ops = [_replace("emails", [_email(person.email)])]
        elif kind == "phone":
            person.phone = f"+4930{self.rng.randrange(10**7, 10**8)}"
            ops = [_replace("phoneNumbers", [_phone(person.phone)])]
        elif kind == "consent":
            person.marketing = not person.marketing
            ops = [_replace(CONSENT, person.marketing)]
        elif kind in ("deactivate", "reactivate"):
            if person.active == (kind == "reactivate"):
                return None
            person.active = kind == "reactivate"
            ops = [_replace("active", person.active)]
        else:  # erase
            person.erased = True
            for group in self.groups:
                group.members.discard(person.n)  # the hub drops an erased member from its groups
            return Op("erase", "DELETE", f"/Users/{person.id}", None, person=person)
        return Op(
            kind, "PATCH", f"/Users/{person.id}", {"schemas": [PATCH], "Operations": ops}, person=person
        )

    def _create(self, *, bad: bool = False) -> Op:
        n = len(self.people)
        email = self.bad_emails[sum(p.bad for p in self.people)] if bad else self._email(n)
        person = Person(
            n,
            email,
            self._name(),
            self._name(),
            f"+4930{self.rng.randrange(10**7, 10**8)}",
            marketing=self.rng.random() < 0.7,
            bad=bad,
        )
        self.people.append(person)
        data = {
            "schemas": [USER_SCHEMA, CUSTOMER_SCHEMA],
            # The sign-up address stays the user name; later address changes change the e-mail only.
            "userName": person.email,
            "name": {"givenName": person.given, "familyName": person.family},
            "emails": [_email(person.email)],
            "phoneNumbers": [_phone(person.phone)],
            "active": True,
            CUSTOMER_SCHEMA: {
                "consents": [{"purpose": "marketing_email", "granted": person.marketing, "source": "signup"}]
            },
        }
        return Op("create", "POST", "/Users", data, person=person)

    def _group(self, live: list[Person]) -> Op | None:
        groups = [g for g in self.groups if g.id and not g.deleted and not g.busy]
        choice = self.rng.random()
        if not groups or (choice < 0.25 and len(groups) < 50):
            group = Group(len(self.groups), f"g{len(self.groups)}-{self._name()}-{self.run}")
            group.members = {p.n for p in self.rng.sample(live, min(len(live), self.rng.randint(1, 5)))}
            self.groups.append(group)
            data = {"schemas": [GROUP_SCHEMA], "displayName": group.name, "members": self._members(group)}
            return Op("group_create", "POST", "/Groups", data, group=group)
        group = self.rng.choice(groups)
        if choice < 0.35:
            group.deleted = True
            return Op("group_delete", "DELETE", f"/Groups/{group.id}", None, group=group)
        if choice < 0.45:
            group.name = f"g{group.n}-{self._name()}-{self.run}"
            ops = [_replace("displayName", group.name)]
        else:
            members = set(group.members)
            for p in self.rng.sample(live, min(len(live), 3)):
                members.symmetric_difference_update({p.n})
            group.members = {m for m in members if not self.people[m].erased}
            ops = [_replace("members", self._members(group))] if group.members else [_remove("members")]
        data = {"schemas": [PATCH], "Operations": ops}
        return Op("group_members", "PATCH", f"/Groups/{group.id}", data, group=group)

    def _members(self, group: Group) -> list[dict[str, str]]:
        return [{"value": str(self.people[m].id)} for m in sorted(group.members)]


def _replace(path: str, value: Any) -> dict[str, Any]:
    return {"op": "replace", "path": path, "value": value}


def _remove(path: str) -> dict[str, Any]:
    return {"op": "remove", "path": path}


def _email(address: str) -> dict[str, Any]:
    return {"value": address, "type": "home", "primary": True}


def _phone(number: str) -> dict[str, Any]:
    return {"value": number, "type": "mobile", "primary": True}


class Driver(threading.Thread):
    """Sends ``total`` changes at about ``rate`` per second in Bulk requests of ``bulk`` operations."""

    def __init__(self, base: str, token: str, workload: Workload, total: int, rate: float, bulk: int) -> None:
        super().__init__(name="chaos-driver", daemon=True)
        self.workload = workload
        self.total, self.rate, self.bulk = total, rate, bulk
        self.client = httpx.Client(
            base_url=f"{base}/scim/v2",
            headers={"Authorization": f"Bearer {token}", "Content-Type": SCIM},
            timeout=60,
        )
        self.sent: Counter[str] = Counter()
        self.resent = 0  # requests sent again after the hub failed to answer
        self.error: BaseException | None = None
        self.started = 0.0
        self.finished = 0.0

    @property
    def count(self) -> int:
        return sum(self.sent.values())

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            while self.count < self.total:
                ops = self.workload.draw(min(self.bulk, self.total - self.count))
                self._send(ops)
                ahead = self.started + self.count / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as exc:  # reported by the run
            self.error = exc
        finally:
            self.finished = time.monotonic()
            self.client.close()

    def _send(self, ops: list[Op]) -> None:
        """Send until every operation is applied; a failed request or operation is sent again."""
        deadline = time.monotonic() + 180
        pending = ops
        first = True
        while pending:
            if not first:
                self.resent += 1
                time.sleep(0.5)
                pending = [op for op in pending if not self._already_done(op)]
                if not pending:
                    break
            first = False
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not take {len(pending)} changes for 180 s")
            operations = []
            for i, op in enumerate(pending):
                operation: dict[str, Any] = {"method": op.method, "path": op.path, "bulkId": f"b{i}"}
                if op.data is not None:
                    operation["data"] = op.data
                operations.append(operation)
            body = {"schemas": [BULK], "Operations": operations}
            try:
                response = self.client.post("/Bulk", json=body)
            except httpx.TransportError:
                continue
            if response.status_code >= 500:
                continue
            if response.status_code != 200:
                raise RuntimeError(f"the hub refused a Bulk request: {response.status_code}")
            answers = {a.get("bulkId"): a for a in response.json().get("Operations", [])}
            failed = []
            for i, op in enumerate(pending):
                answer = answers.get(f"b{i}") or {}
                status = int(answer.get("status") or 500)
                if status < 300:
                    self._done(op, answer.get("location"))
                elif status >= 500:
                    failed.append(op)
                elif status == 404 and op.method == "DELETE":
                    self._done(op, None)  # applied by an earlier attempt
                elif status == 409 and op.method == "POST":
                    failed.append(op)  # committed by an earlier attempt: looked up before the next
                else:
                    raise RuntimeError(
                        f"the hub refused a {op.kind} change: {status} {answer.get('response')}"
                    )
            pending = failed

    def _already_done(self, op: Op) -> bool:
        """Whether a create sent in an unanswered request did commit (then its id is taken from the hub)."""
        if op.method != "POST":
            return False
        if op.person is not None:
            query = f'userName eq "{op.person.email}"' if op.person.id is None else None
            endpoint = "/Users"
        else:
            assert op.group is not None
            query, endpoint = f'displayName eq "{op.group.name}"', "/Groups"
        if query is None:
            return False
        response = self.client.get(endpoint, params={"filter": query})
        if response.status_code != 200:
            return False
        found = response.json().get("Resources") or []
        if not found:
            return False
        self._done(op, str(found[0]["id"]))
        return True

    def _done(self, op: Op, location: str | None) -> None:
        thing = op.person or op.group
        assert thing is not None
        if op.method == "POST" and location:
            thing.id = location.rstrip("/").rsplit("/", 1)[-1]
        thing.busy = False
        self.sent[op.kind] += 1
