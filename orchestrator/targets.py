"""Target configuration: the targets file (YAML), validated at start, and the per-identity sync decision.

Every problem in the file is reported, each on one line naming the target and the key, all at once::

    idhub: targets.yaml: target 'news': on_delete: must be one of delete, anonymize, erase
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from scim2_models import ScimFilter
from scim2_models.path.expressions import LogicalExpr, LogicalOperator

from connectors.base import ConnectorSettings, DeprovisionAction
from orchestrator.mapping import MappingError, compile_filter, compile_mapping, parse_user_filter

BUILTIN_CONNECTORS: Final = ("scim", "shop", "newsletter", "crm", "webhook")
_NAME_RE: Final = re.compile(r"[a-z0-9_-]+")
# Upper case only, as environment variables are named: a pasted secret (sk_live_..., whsec_...) is refused
# without being echoed.
_ENV_RE: Final = re.compile(r"[A-Z_][A-Z0-9_]*")
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|sec|m|min|h|d)")


class TargetConfigError(ValueError):
    """The targets file is wrong; ``lines`` holds one line per problem and ``str()`` joins them."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class DeprovisionPolicy(StrEnum):
    DELETE = "delete"
    DEACTIVATE = "deactivate"
    ANONYMIZE = "anonymize"
    ERASE = "erase"


_ON_DEACTIVATE: Final = (DeprovisionPolicy.DELETE, DeprovisionPolicy.DEACTIVATE, DeprovisionPolicy.ANONYMIZE)
_ON_DELETE: Final = (DeprovisionPolicy.DELETE, DeprovisionPolicy.ANONYMIZE, DeprovisionPolicy.ERASE)


def parse_duration(value: object) -> float:
    """Seconds in ``1s``, ``250ms``, ``5m``, ``1h``, ``3d`` (or a bare number of seconds); ValueError else."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 10s, 5m, 1h or 3d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError("must be a duration such as 10s, 5m, 1h or 3d")
    if seconds <= 0:
        raise ValueError("must be a positive duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


@dataclass(frozen=True)
class Rate:
    """``count`` operations per ``period`` seconds."""

    count: float
    period: float
    text: str = ""

    @property
    def per_second(self) -> float:
        return self.count / self.period

    @classmethod
    def parse(cls, value: object) -> Rate:
        """``50/s``, ``600/min``, ``1000/h``, ``100/10s``; ValueError otherwise."""
        if isinstance(value, Rate):
            return value
        if not isinstance(value, str) or (m := _RATE_RE.fullmatch(value.strip())) is None:
            raise ValueError("must be a rate such as 50/s, 600/min or 1000/h")
        unit = {"sec": "s", "min": "m"}.get(m.group(3), m.group(3))
        count, period = float(m.group(1)), float(m.group(2) or 1) * _UNIT_SECONDS[unit]
        if count <= 0 or period <= 0:
            raise ValueError("must be a positive rate")
        return cls(count, period, value.strip())

    def __str__(self) -> str:
        return self.text or f"{self.count:g}/{self.period:g}s"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Strict):
    max_attempts: int = Field(default=12, ge=1)
    max_age: Duration = 3 * 86400.0
    base: Duration = 1.0
    cap: Duration = 3600.0

    @field_validator("cap")
    @classmethod
    def _cap_above_base(cls, cap: float, info: Any) -> float:
        if cap < info.data.get("base", 0):
            raise ValueError("must not be below base")
        return cap


class QuarantinePolicy(_Strict):
    threshold: int = Field(default=20, ge=1)
    probe_base: Duration = 5.0
    probe_cap: Duration = 600.0

    @field_validator("probe_cap")
    @classmethod
    def _cap_above_base(cls, cap: float, info: Any) -> float:
        if cap < info.data.get("probe_base", 0):
            raise ValueError("must not be below probe_base")
        return cap


def _policy(allowed: tuple[DeprovisionPolicy, ...]) -> Any:
    def check(value: object) -> DeprovisionPolicy:
        if isinstance(value, str) and value in {p.value for p in allowed}:
            return DeprovisionPolicy(value)
        raise ValueError("must be one of " + ", ".join(p.value for p in allowed))

    return BeforeValidator(check)


@dataclass(frozen=True)
class Scope:
    """A compiled scope filter: the whole of it, and its top-level ``and`` terms for the reason."""

    text: str
    whole: Callable[[Any], bool]
    terms: tuple[tuple[str, Callable[[Any], bool]], ...]


@lru_cache(maxsize=256)
def compile_scope(text: str) -> Scope:
    """Parse a scope filter over the hub's User; ValueError (one line) when it is not valid."""
    node = parse_user_filter(text)
    original = ScimFilter(text).ast
    if isinstance(node, LogicalExpr) and node.op is LogicalOperator.and_:
        assert isinstance(original, LogicalExpr)
        pairs = tuple(zip(original.terms, node.terms, strict=True))
    else:
        pairs = ((original, node),)
    return Scope(
        text=text,
        whole=compile_filter(node),
        terms=tuple((str(short), compile_filter(full)) for short, full in pairs),
    )


def _check_scope(value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a SCIM filter string")
    try:
        compile_scope(value)
    except ValueError as exc:
        raise ValueError(f"invalid filter: {exc}") from None
    return value


def _check_rate(value: object) -> Rate | None:
    return None if value is None else Rate.parse(value)


class TargetConfig(_Strict):
    """One target of the targets file."""

    name: str
    connector: str
    url: str
    token_env: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    mapping: dict[str, str] | None = None  # None: the connector's default mapping
    scope: Annotated[str | None, BeforeValidator(_check_scope)] = None
    on_deactivate: Annotated[DeprovisionPolicy, _policy(_ON_DEACTIVATE)] = DeprovisionPolicy.DEACTIVATE
    on_delete: Annotated[DeprovisionPolicy, _policy(_ON_DELETE)] = DeprovisionPolicy.DELETE
    on_leave_scope: Annotated[DeprovisionPolicy, _policy(_ON_DEACTIVATE)] = DeprovisionPolicy.DEACTIVATE
    # Requests to the target, as targets count them: a batch call is one, however many records it carries.
    rate_limit: Annotated[Rate | None, BeforeValidator(_check_rate)] = None
    # One delivery at a time by default, so a slow target never holds more than one worker process and the
    # other targets keep theirs (invariant 4); raise it with workers dedicated to the target's queue.
    concurrency: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=100, ge=1, le=10_000)
    timeout: Duration = 10.0
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    quarantine: QuarantinePolicy = Field(default_factory=QuarantinePolicy)
    groups: bool = False
    priority_paths: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError("must match [a-z0-9_-]+")
        return value

    @field_validator("connector")
    @classmethod
    def _connector(cls, value: str) -> str:
        known = known_connectors()
        if value not in known:
            raise ValueError("unknown connector; known: " + ", ".join(known))
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a URL such as https://host/path")
        return value

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_RE.fullmatch(value):
            raise ValueError("must be the NAME of an environment variable (upper case), not a secret")
        return value

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            try:
                compile_mapping(value)
            except MappingError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def queue(self) -> str:
        """The Celery queue of this target's deliveries."""
        return f"target.{self.name}"


def known_connectors() -> list[str]:
    """Connector kinds the registry knows (plugins included), plus the built-in names."""
    try:
        from connectors import registry
    except ImportError:
        return list(BUILTIN_CONNECTORS)
    return sorted(set(registry.kinds()) | set(BUILTIN_CONNECTORS))


def _supports_groups(kind: str) -> bool | None:
    """Whether the connector of ``kind`` pushes groups; None when that cannot be told now."""
    try:
        from connectors import registry

        return bool(registry.connector_class(kind).supports_groups)
    except Exception:
        return None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES: Final = {
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind in _MESSAGES:
        return _MESSAGES[kind].format(**error.get("ctx", {}))
    msg = str(error["msg"])
    return msg[:1].lower() + msg[1:]


def parse_targets(text: str, source: str = "targets.yaml", *, check_env: bool = True) -> list[TargetConfig]:
    """Parse and validate a targets file's text; TargetConfigError lists every problem, one per line."""
    prefix = f"idhub: {source}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TargetConfigError([f"{prefix}:{where}: not valid YAML"]) from None
    if data is None:
        data = {"targets": []}
    if not isinstance(data, dict):
        raise TargetConfigError([f"{prefix}: must be a mapping with a 'targets' list"])
    errors = [f"{prefix}: {key}: unknown key" for key in data if key != "targets"]
    raw_targets = data.get("targets")
    raw_targets = [] if raw_targets is None else raw_targets
    if not isinstance(raw_targets, list):
        raise TargetConfigError([*errors, f"{prefix}: targets: must be a list"])

    configs: list[TargetConfig] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_targets, start=1):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = (
            f"{prefix}: target {name!r}" if isinstance(name, str) and name else f"{prefix}: target #{index}"
        )
        if not isinstance(raw, dict):
            errors.append(f"{label}: must be a mapping")
            continue
        if isinstance(name, str):
            if name in seen:
                errors.append(f"{label}: name: duplicate (also target #{seen[name]})")
            seen.setdefault(name, index)
        token_env = raw.get("token_env")
        # Only a well-formed name is echoed: a secret pasted in by mistake must not reach a log line.
        if (
            check_env
            and isinstance(token_env, str)
            and _ENV_RE.fullmatch(token_env)
            and token_env not in os.environ
        ):
            errors.append(f"{label}: token_env: environment variable {token_env} is not set")
        try:
            cfg = TargetConfig.model_validate(raw)
        except ValidationError as exc:
            errors.extend(f"{label}: {_loc(e['loc'])}: {_message(e)}" for e in exc.errors())
            continue
        if cfg.groups and _supports_groups(cfg.connector) is False:
            errors.append(f"{label}: groups: connector {cfg.connector} does not support groups")
        configs.append(cfg)
    if errors:
        raise TargetConfigError(errors)
    return configs


def load_targets(path: str | os.PathLike[str]) -> list[TargetConfig]:
    """Read and validate the targets file at ``path`` (``IDHUB_TARGETS_FILE``)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise TargetConfigError([f"idhub: {source.name}: cannot read: {exc.strerror}"]) from None
    return parse_targets(text, source.name)


def connector_settings(cfg: TargetConfig) -> ConnectorSettings:
    """What the target's connector is built from; the token is read from ``token_env`` now."""
    token = None
    if cfg.token_env is not None:
        token = os.environ.get(cfg.token_env)
        if token is None:
            raise TargetConfigError(
                [f"idhub: target {cfg.name!r}: token_env: environment variable {cfg.token_env} is not set"]
            )
    return ConnectorSettings(
        name=cfg.name,
        url=cfg.url,
        token=token,
        timeout=cfg.timeout,
        max_connections=cfg.concurrency,
        options=dict(cfg.options),
    )


# -- decisions ---------------------------------------------------------------------------------------------

Action = Literal["upsert", "deactivate", "delete", "anonymize", "erase", "none"]


@dataclass(frozen=True)
class Decision:
    """What to do with one identity at one target, and a short PII-free reason."""

    action: Action
    reason: str

    @classmethod
    def by_policy(cls, policy: DeprovisionPolicy, reason: str) -> Decision:
        return cls(policy.value, reason)

    @property
    def deprovision(self) -> DeprovisionAction | None:
        """The connector action, for the deprovisioning decisions."""
        return None if self.action in ("upsert", "none") else DeprovisionAction(self.action)


def _doc(user: Any) -> Mapping[str, Any]:
    doc = user if isinstance(user, Mapping) else user.model_dump()
    # The hub counts a User without ``active`` as active (so does its SQL); scopes must agree.
    return doc if "active" in doc else {**doc, "active": True}


def in_scope(cfg: TargetConfig, user_doc: Mapping[str, Any]) -> bool:
    """Whether the identity (its SCIM document: ``User[...].model_dump()`` plus id, meta) is in scope."""
    return cfg.scope is None or compile_scope(cfg.scope).whole(_doc(user_doc))


def failing_scope_term(cfg: TargetConfig, user_doc: Mapping[str, Any]) -> str | None:
    """The first top-level ``and`` term of the scope the identity fails (the whole filter if not an
    ``and``), or None when it is in scope."""
    if cfg.scope is None:
        return None
    doc = _doc(user_doc)
    scope = compile_scope(cfg.scope)
    if scope.whole(doc):
        return None
    for text, term in scope.terms:
        if not term(doc):
            return text
    return scope.text


def decide(cfg: TargetConfig, doc: Any | None, *, deleted: bool, previously_provisioned: bool) -> Decision:
    """Upsert, deprovision by the target's policy, or nothing, for one identity's current state.

    ``doc`` is the identity's SCIM document; it may be None only when ``deleted``.
    """
    if deleted or doc is None:
        return Decision.by_policy(cfg.on_delete, "deleted")
    user = _doc(doc)
    if user.get("active") is False:
        if previously_provisioned:
            return Decision.by_policy(cfg.on_deactivate, "deactivated")
        return Decision("none", "never provisioned, deactivated")
    failing = failing_scope_term(cfg, user)
    if failing is None:
        return Decision("upsert", "in scope")
    if previously_provisioned:
        return Decision.by_policy(cfg.on_leave_scope, f"left scope: {failing[:120]}")
    return Decision("none", "never provisioned, out of scope")


__all__ = [
    "Decision",
    "DeprovisionPolicy",
    "QuarantinePolicy",
    "Rate",
    "RetryPolicy",
    "TargetConfig",
    "TargetConfigError",
    "compile_scope",
    "connector_settings",
    "decide",
    "failing_scope_term",
    "in_scope",
    "load_targets",
    "parse_duration",
    "parse_targets",
]
