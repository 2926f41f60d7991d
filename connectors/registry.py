"""Which connector class serves a target's ``connector:`` kind: the built-ins, then entry-point plugins.

Built-ins are imported lazily by module path, so one that fails to import breaks only its own kind.
Third-party connectors register a ``Connector`` subclass under the ``idhub.connectors`` entry-point group
(``[project.entry-points."idhub.connectors"] mykind = "pkg.module:MyConnector"``). Every connector class is
built as ``cls(settings)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from importlib.metadata import entry_points
from types import ModuleType

from connectors.base import Connector, ConnectorSettings

ENTRY_POINT_GROUP = "idhub.connectors"

BUILTINS: dict[str, str] = {
    "scim": "connectors.scim",
    "shop": "connectors.shop",
    "newsletter": "connectors.newsletter",
    "crm": "connectors.crm",
    "webhook": "connectors.webhook",
}


def kinds() -> list[str]:
    """Every kind ``build`` accepts right now, sorted (built-ins whose module exists, then plugins)."""
    found = {kind for kind, module in BUILTINS.items() if importlib.util.find_spec(module) is not None}
    found.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(found)


def connector_class(kind: str) -> type[Connector]:
    """The Connector subclass for ``kind``; a one-line ValueError naming the known kinds when none."""
    module = BUILTINS.get(kind)
    if module is not None and importlib.util.find_spec(module) is not None:
        return _from_module(importlib.import_module(module), kind)
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=kind):
        loaded = ep.load()
        if isinstance(loaded, ModuleType):
            return _from_module(loaded, kind)
        if inspect.isclass(loaded) and issubclass(loaded, Connector):
            return loaded
        raise ValueError(f"entry point {ep.value!r} for connector kind {kind!r} is not a Connector class")
    raise ValueError(f"unknown connector kind {kind!r}; known kinds: {', '.join(kinds()) or 'none'}")


def build(kind: str, settings: ConnectorSettings) -> Connector:
    """A ready connector of ``kind`` for the target ``settings`` describes."""
    return connector_class(kind)(settings)  # type: ignore[call-arg]


def _from_module(module: ModuleType, kind: str) -> type[Connector]:
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Connector) and not inspect.isabstract(obj) and getattr(obj, "kind", None) == kind:
            return obj
    raise ValueError(f"module {module.__name__} has no Connector class with kind {kind!r}")
