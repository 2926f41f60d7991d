"""The app target: an outbound SCIM 2.0 client (RFC 7643 resources, RFC 7644 protocol) over httpx.

Speaks ``/ServiceProviderConfig`` (read once, lazily), ``/Users`` (filter ``eq`` on userName and externalId,
``startIndex``/``count`` paging, POST, GET, PATCH with PatchOp, PUT, DELETE), ``/Groups`` and ``/Bulk``.
``settings.url`` is the service root (``https://app.example/scim/v2``). The hub's identity id travels as
``externalId``. Options: ``update_method`` (``patch`` default, or ``put``), ``page_size`` (list paging).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from connectors.base import (
    Connector,
    ConnectorSettings,
    DeprovisionAction,
    Page,
    Record,
    RemoteAccount,
    Result,
)
from connectors.errors import ConflictError, GoneError, PermanentError, RetryableError, SyncError
from connectors.http import encode, error_for, json_of, make_client, send

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
CUSTOMER_SCHEMA = "urn:idhub:schemas:extension:customer:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
BULK_REQUEST = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"
SCIM_JSON = "application/scim+json"

# What anonymisation removes: every personal attribute of the core User and the customer extension.
PERSONAL_ATTRIBUTES = (
    "name",
    "displayName",
    "nickName",
    "emails",
    "phoneNumbers",
    "addresses",
    "photos",
    "ims",
    CUSTOMER_SCHEMA,
)
_LOOKUP_GROUP = 20  # records per or-filter when a batch looks its accounts up
_MAX_ETAGS = 10_000  # remembered ETags; beyond that the oldest are forgotten and re-read when needed


@dataclass(frozen=True)
class ProviderConfig:
    """What the target's /ServiceProviderConfig advertises (RFC 7643 §5), with the defaults we assume."""

    etag: bool = False
    patch: bool = True
    filter: bool = True
    bulk: bool = False
    bulk_max_operations: int = 0
    bulk_max_payload: int = 0

    @classmethod
    def parse(cls, doc: Mapping[str, Any]) -> ProviderConfig:
        """Read a ServiceProviderConfig document; missing sections keep the defaults."""

        def section(name: str) -> Mapping[str, Any]:
            value = doc.get(name)
            return value if isinstance(value, Mapping) else {}

        bulk = section("bulk")
        return cls(
            etag=bool(section("etag").get("supported", False)),
            patch=bool(section("patch").get("supported", True)),
            filter=bool(section("filter").get("supported", True)),
            bulk=bool(bulk.get("supported", False)) and int(bulk.get("maxOperations") or 0) > 1,
            bulk_max_operations=int(bulk.get("maxOperations") or 0),
            bulk_max_payload=int(bulk.get("maxPayloadSize") or 0),
        )


class ScimConnector(Connector):
    """A SCIM 2.0 service provider; thread-safe, one pooled client."""

    kind = "scim"
    match_field = "userName"
    default_mapping = {
        "userName": "userName",
        "name.givenName": "name.givenName",
        "name.familyName": "name.familyName",
        "displayName": "displayName",
        "emails": "emails",
        "active": "active",
        "locale": "locale",
        CUSTOMER_SCHEMA: CUSTOMER_SCHEMA,
    }
    supports_list = True
    supports_groups = True
    supports_read = True
    max_batch = 100

    def __init__(self, settings: ConnectorSettings, *, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        self._provider: ProviderConfig | None = None
        self._lock = threading.Lock()
        self._etags: dict[str, str] = {}

    @property
    def supports_batch(self) -> bool:  # type: ignore[override]  # the target's ServiceProviderConfig decides
        """True when the target advertises SCIM Bulk (reads /ServiceProviderConfig once)."""
        return self.provider_config().bulk

    # -- discovery ---------------------------------------------------------------------------------------

    def provider_config(self) -> ProviderConfig:
        """The target's advertised features, read once; a target without the endpoint gets the defaults."""
        with self._lock:
            if self._provider is None:
                response = send(self.client, "GET", "ServiceProviderConfig", expect={404, 501})
                ok = response.status_code == 200 and response.content
                self._provider = ProviderConfig.parse(json_of(response)) if ok else ProviderConfig()
            return self._provider

    def probe(self) -> None:
        """Return when the target answers an authenticated GET /Users?count=1; RetryableError if not.

        Targets that refuse unfiltered listing are probed at /ServiceProviderConfig instead.
        """
        response = send(self.client, "GET", "Users", params={"count": 1}, expect={400, 404, 501})
        if response.status_code >= 300:
            send(self.client, "GET", "ServiceProviderConfig")

    # -- users -------------------------------------------------------------------------------------------

    def upsert(self, record: Record) -> Result:
        """Update by remote id, else adopt by userName then externalId, else create (adopting on 409)."""
        if record.remote_id:
            return self._update(record.remote_id, record, "updated")
        # userName is unique at a SCIM service provider (RFC 7643 §4.1): a first attempt creates, and a
        # 409 says the account exists. Later attempts look first, as an earlier try may have created it.
        found = None if record.first_attempt else self._find_record(record)
        if found:
            return self._update(found, record, "adopted")
        try:
            return self._create(record)
        except ConflictError:
            found = self._find_record(record)
            if not found:
                raise
            return self._update(found, record, "adopted")

    def upsert_many(self, records: Sequence[Record]) -> list[Result | Exception]:
        """Upsert through SCIM Bulk when advertised (chunked by maxOperations), else one by one."""
        config = self.provider_config()
        if not config.bulk or len(records) < 2:
            return super().upsert_many(records)
        found = self._lookup_many([r for r in records if not r.remote_id and not r.first_attempt])
        plans = [self._plan(record, found.get(record.identity_id)) for record in records]
        out: list[Result | Exception | None] = [None] * len(records)
        indexes = list(range(len(records)))
        size = config.bulk_max_operations
        for start in range(0, len(indexes), size):
            chunk = indexes[start : start + size]
            try:
                self._bulk(chunk, records, plans, out)
            except SyncError as exc:
                if not any(isinstance(r, Result) for r in out):
                    raise  # nothing got through: the whole batch failed
                for i in indexes[start:]:
                    out[i] = out[i] or exc
                break
        return [r if r is not None else PermanentError("no bulk answer", code="bulk") for r in out]

    def deprovision(self, record: Record, action: DeprovisionAction) -> Result:
        """DELETE/ERASE remove the account, DEACTIVATE sets active=false, ANONYMIZE strips personal data."""
        remote_id = record.remote_id or self._find_record(record)
        if not remote_id:
            return Result(None, "absent")
        try:
            if action in (DeprovisionAction.DELETE, DeprovisionAction.ERASE):
                send(self.client, "DELETE", f"Users/{remote_id}")
                self._forget(remote_id)
            elif action is DeprovisionAction.DEACTIVATE:
                self._write(remote_id, "PATCH", _patch([_replace("active", False)]))
            else:
                ops = [{"op": "remove", "path": name} for name in PERSONAL_ATTRIBUTES]
                ops.append(_replace("userName", f"anon-{record.identity_id}"))
                self._write(remote_id, "PATCH", _patch(ops))
        except GoneError:
            self._forget(remote_id)
            return Result(remote_id, "absent")
        return Result(remote_id, "deprovisioned", action.value)

    def find(self, match_key: str) -> str | None:
        """The id of the user whose userName equals ``match_key`` (case-insensitively per RFC 7643)."""
        resources = self._search("Users", f'userName eq "{escape(match_key)}"', 1)
        return str(resources[0]["id"]) if resources else None

    def read(self, remote_id: str) -> Mapping[str, Any] | None:
        """The user as the target holds it, without ``schemas``, ``id`` and ``meta``; None when absent."""
        response = send(self.client, "GET", f"Users/{remote_id}", expect={404})
        if response.status_code == 404:
            self._forget(remote_id)
            return None
        doc = json_of(response)
        self._remember(remote_id, response, doc)
        return {k: v for k, v in doc.items() if k not in ("schemas", "id", "meta")}

    def list_accounts(self, cursor: str | None = None) -> Page:
        """One page of /Users by startIndex; the cursor is the next startIndex."""
        start = int(cursor or 1)
        count = int(self.settings.options.get("page_size", 100))
        doc = json_of(send(self.client, "GET", "Users", params={"startIndex": start, "count": count}))
        resources = doc.get("Resources") or []
        accounts = [
            RemoteAccount(
                remote_id=str(r["id"]),
                match_key=r.get("userName"),
                attributes={k: v for k, v in r.items() if k not in ("schemas", "id", "meta")},
                external_id=r.get("externalId"),
            )
            for r in resources
        ]
        following = start + len(resources)
        more = bool(resources) and following <= int(doc.get("totalResults", 0))
        return Page(accounts, str(following) if more else None)

    # -- groups ------------------------------------------------------------------------------------------

    def upsert_group(
        self, group_id: str, display_name: str, member_remote_ids: Sequence[str], remote_id: str | None = None
    ) -> Result:
        """Create or update a group (externalId = hub group id) holding exactly these members."""
        members = [{"value": m} for m in member_remote_ids]
        outcome = "updated"
        if not remote_id:
            remote_id = self._find_group(group_id, display_name)
            outcome = "adopted"
        if not remote_id:
            body = {"schemas": [GROUP_SCHEMA], "externalId": group_id, "displayName": display_name}
            try:
                response = send(self.client, "POST", "Groups", **_body({**body, "members": members}))
            except ConflictError:
                remote_id = self._find_group(group_id, display_name)
                if not remote_id:
                    raise
            else:
                return Result(_id_of(response), "created")
        if self._use_put():
            doc: dict[str, Any] = {"schemas": [GROUP_SCHEMA], "id": remote_id, "externalId": group_id}
            doc |= {"displayName": display_name, "members": members}
            send(self.client, "PUT", f"Groups/{remote_id}", **_body(doc))
        else:
            ops = [_replace("externalId", group_id), _replace("displayName", display_name)]
            ops.append(_replace("members", members) if members else {"op": "remove", "path": "members"})
            send(self.client, "PATCH", f"Groups/{remote_id}", **_body(_patch(ops)))
        return Result(remote_id, outcome)

    def delete_group(self, group_id: str, remote_id: str | None = None) -> Result:
        """Delete a group, found by externalId when its id is not known; an absent one gives ``absent``."""
        if not remote_id:
            # Never by displayName here: another group may carry the name, and deleting it would be wrong.
            found = self._search("Groups", f'externalId eq "{escape(group_id)}"', 1)
            if not found:
                return Result(None, "absent")
            remote_id = str(found[0]["id"])
        response = send(self.client, "DELETE", f"Groups/{remote_id}", expect={404})
        return Result(remote_id, "absent" if response.status_code == 404 else "deprovisioned")

    def close(self) -> None:
        """Release pooled connections."""
        self.client.close()

    # -- internals ---------------------------------------------------------------------------------------

    def _use_put(self) -> bool:
        return self.settings.options.get("update_method") == "put" or not self.provider_config().patch

    def _create(self, record: Record) -> Result:
        response = send(self.client, "POST", "Users", **_body(_resource(record)))
        remote_id = _id_of(response)
        self._remember(remote_id, response, _json_or_empty(response))
        return Result(remote_id, "created")

    def _update_request(self, remote_id: str, record: Record) -> tuple[str, dict[str, Any]]:
        if self._use_put():
            return "PUT", {**_resource(record), "id": remote_id}
        return "PATCH", _patch(_patch_ops(record))

    def _update(self, remote_id: str, record: Record, outcome: str) -> Result:
        method, body = self._update_request(remote_id, record)
        self._write(remote_id, method, body)
        return Result(remote_id, outcome)

    def _write(self, remote_id: str, method: str, body: Mapping[str, Any]) -> None:
        """PATCH or PUT a user, with If-Match when the target does ETags; one re-read on 412."""
        etag_aware = self.provider_config().etag
        for attempt in range(2):
            etag = None
            if etag_aware:
                etag = self._etags.get(remote_id) if attempt == 0 else None
                etag = etag or self._fetch_etag(remote_id)
            response = send(self.client, method, f"Users/{remote_id}", expect={412}, **_body(body, etag))
            if response.status_code != 412:
                self._remember(remote_id, response, _json_or_empty(response))
                return
        raise RetryableError(f"{method} /Users/{{}} -> 412 twice", code="precondition_failed", status=412)

    def _fetch_etag(self, remote_id: str) -> str | None:
        response = send(self.client, "GET", f"Users/{remote_id}")  # 404 -> GoneError
        return self._remember(remote_id, response, json_of(response))

    def _remember(self, remote_id: str, response: httpx.Response, doc: Mapping[str, Any]) -> str | None:
        meta = doc.get("meta")
        etag = response.headers.get("ETag") or (meta.get("version") if isinstance(meta, Mapping) else None)
        with self._lock:
            self._etags.pop(remote_id, None)
            if etag:
                self._etags[remote_id] = str(etag)
                if len(self._etags) > _MAX_ETAGS:
                    del self._etags[next(iter(self._etags))]
        return str(etag) if etag else None

    def _forget(self, remote_id: str) -> None:
        with self._lock:
            self._etags.pop(remote_id, None)

    def _search(self, endpoint: str, filter_: str, count: int) -> list[dict[str, Any]]:
        response = send(self.client, "GET", endpoint, params={"filter": filter_, "count": count})
        resources = json_of(response).get("Resources") or []
        return [r for r in resources if isinstance(r, dict) and r.get("id")]

    def _find_record(self, record: Record) -> str | None:
        key = record.match_key or record.attributes.get("userName")
        if key:
            found = self.find(str(key))
            if found:
                return found
        by_external = self._search("Users", f'externalId eq "{escape(record.identity_id)}"', 1)
        return str(by_external[0]["id"]) if by_external else None

    def _lookup_many(self, records: Sequence[Record]) -> dict[str, str]:
        """Remote ids of existing accounts for records without one, by identity id (one query per group)."""
        found: dict[str, str] = {}
        for group in _chunks(list(records), _LOOKUP_GROUP):
            clauses = []
            for record in group:
                key = record.match_key or record.attributes.get("userName")
                if key:
                    clauses.append(f'userName eq "{escape(str(key))}"')
                clauses.append(f'externalId eq "{escape(record.identity_id)}"')
            try:
                resources = self._search("Users", " or ".join(clauses), 2 * len(group))
            except PermanentError:  # a target that filters with one eq only: look each up alone
                for record in group:
                    remote_id = self._find_record(record)
                    if remote_id:
                        found[record.identity_id] = remote_id
                continue
            by_name = {str(r.get("userName", "")).lower(): str(r["id"]) for r in resources}
            by_external = {str(r.get("externalId")): str(r["id"]) for r in resources if r.get("externalId")}
            for record in group:
                key = str(record.match_key or record.attributes.get("userName") or "").lower()
                remote_id = by_name.get(key) if key else None
                remote_id = remote_id or by_external.get(record.identity_id)
                if remote_id:
                    found[record.identity_id] = remote_id
        return found

    def _plan(self, record: Record, adopted_id: str | None) -> tuple[str, str, dict[str, Any], str]:
        """The bulk operation for a record: (method, path, data, outcome on success)."""
        remote_id = record.remote_id or adopted_id
        if not remote_id:
            return "POST", "/Users", _resource(record), "created"
        method, body = self._update_request(remote_id, record)
        return method, f"/Users/{remote_id}", body, "updated" if record.remote_id else "adopted"

    def _bulk(
        self,
        chunk: list[int],
        records: Sequence[Record],
        plans: Sequence[tuple[str, str, dict[str, Any], str]],
        out: list[Result | Exception | None],
    ) -> None:
        """Send one Bulk request for ``chunk`` (halving on 413 or an oversized payload) and fill ``out``."""
        operations = [
            {"method": plans[i][0], "path": plans[i][1], "bulkId": f"r{i}", "data": plans[i][2]}
            for i in chunk
        ]
        payload = encode({"schemas": [BULK_REQUEST], "Operations": operations})
        limit = self.provider_config().bulk_max_payload
        too_big = bool(limit) and len(payload) > limit
        response = None
        if not too_big:
            headers = {"Content-Type": SCIM_JSON}
            response = send(self.client, "POST", "Bulk", expect={413}, content=payload, headers=headers)
        if response is None or response.status_code == 413:
            if len(chunk) == 1:
                out[chunk[0]] = PermanentError(
                    "POST /Bulk -> 413 for one operation", code="too_large", status=413
                )
                return
            half = len(chunk) // 2
            self._bulk(chunk[:half], records, plans, out)
            self._bulk(chunk[half:], records, plans, out)
            return
        answers = {str(op.get("bulkId")): op for op in json_of(response).get("Operations") or []}
        for i in chunk:
            out[i] = self._bulk_result(records[i], plans[i], answers.get(f"r{i}"))

    def _bulk_result(
        self, record: Record, plan: tuple[str, str, dict[str, Any], str], answer: Mapping[str, Any] | None
    ) -> Result | Exception:
        method, path, _, outcome = plan
        if answer is None:
            return RetryableError(f"{method} /Bulk: operation not answered", code="bulk_unanswered")
        status = int(answer.get("status") or 0)
        if 200 <= status < 300:
            location = str(answer.get("location") or "")
            remote_id = location.rstrip("/").rsplit("/", 1)[-1] if location else path.rsplit("/", 1)[-1]
            with self._lock:
                self._etags.pop(remote_id, None)
                if answer.get("version"):
                    self._etags[remote_id] = str(answer["version"])
            return Result(remote_id, outcome)
        if status in (409, 412) and not (status == 409 and record.remote_id):
            try:  # someone created or changed it meanwhile: the single path finds and adopts it
                return self.upsert(replace(record, first_attempt=False))
            except SyncError as exc:
                return exc
        body = answer.get("response")
        request = httpx.Request(method, self.client.base_url.join(path.lstrip("/")))
        return error_for(httpx.Response(status, json=body if isinstance(body, dict) else {}, request=request))

    def _find_group(self, group_id: str, display_name: str) -> str | None:
        found = self._search("Groups", f'externalId eq "{escape(group_id)}"', 1)
        if not found:
            # A namesake is adopted only when no other hub group owns it, or two hub groups would merge.
            named = self._search("Groups", f'displayName eq "{escape(display_name)}"', 10)
            found = [g for g in named if not g.get("externalId")]
        return str(found[0]["id"]) if found else None


def escape(value: str) -> str:
    """A value made safe inside a double-quoted SCIM filter string (RFC 7644 §3.4.2.2, JSON string rules)."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _resource(record: Record) -> dict[str, Any]:
    """The full User resource a record maps to, with the hub id as externalId; None values dropped."""
    attrs = _strip_none({k: v for k, v in record.attributes.items() if k not in ("id", "meta", "schemas")})
    if "userName" not in attrs and record.match_key:
        attrs["userName"] = record.match_key
    extensions = sorted(k for k in attrs if k.startswith("urn:"))
    return {"schemas": [USER_SCHEMA, *extensions], "externalId": record.identity_id, **attrs}


def _patch_ops(record: Record) -> list[dict[str, Any]]:
    """Replace every mapped attribute; a None value (at the top or one level down) removes it."""
    ops: list[dict[str, Any]] = [_replace("externalId", record.identity_id)]
    for name, value in record.attributes.items():
        if name in ("id", "meta", "schemas"):
            continue
        if value is None:
            ops.append({"op": "remove", "path": name})
        elif isinstance(value, Mapping):
            sep = ":" if name.startswith("urn:") else "."
            ops.extend({"op": "remove", "path": f"{name}{sep}{k}"} for k, v in value.items() if v is None)
            kept = _strip_none(value)
            if kept:
                ops.append(_replace(name, kept))
        else:
            ops.append(_replace(name, _strip_none(value)))
    return ops


def _replace(path: str, value: Any) -> dict[str, Any]:
    return {"op": "replace", "path": path, "value": value}


def _patch(ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schemas": [PATCH_OP], "Operations": ops}


def _body(doc: Mapping[str, Any], etag: str | None = None) -> dict[str, Any]:
    """Request keyword arguments sending ``doc`` as application/scim+json (If-Match ``etag`` when given)."""
    headers = {"Content-Type": SCIM_JSON} | ({"If-Match": etag} if etag else {})
    return {"content": encode(doc), "headers": headers}


_LEAVES = frozenset({str, int, float, bool})


def _strip_none(value: Any) -> Any:
    # Leaves are passed over without a call: this ran for every attribute of every record sent. A dict is
    # told apart before the ABC check (62 ns against 122: this runs for every value of every record).
    if isinstance(value, (dict, Mapping)):
        return {k: v if type(v) in _LEAVES else _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [v if type(v) in _LEAVES else _strip_none(v) for v in value if v is not None]
    return value


def _id_of(response: httpx.Response) -> str:
    """The new resource's id from the body, else from the Location header."""
    doc = _json_or_empty(response)
    if doc.get("id"):
        return str(doc["id"])
    location = str(response.headers.get("Location", ""))
    if location:
        return location.rstrip("/").rsplit("/", 1)[-1]
    raise PermanentError(f"{response.request.method} -> {response.status_code} without an id", code="no_id")


def _json_or_empty(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        doc = json_of(response)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _chunks(items: list[Record], size: int) -> Iterator[list[Record]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
