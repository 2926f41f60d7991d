"""User creations and PATCHes that carry only plain values, read without scim2-models.

scim2-models validates a request into a model (per object it resolves every key against the schema and checks
every field's mutability and necessity), and the hub dumps that model again to store it. For a PATCH it also
reads the stored resource into a model, deep-copies it as a rollback snapshot and resolves each path against
the model. In-process on PostgreSQL that was 1.9 ms of CPU for the PATCH of a nickname and 1 ms for a
creation, most of it in the library, while the bodies identity providers, shops and registration forms send
are mostly simple: a creation with a userName, a name, e-mail addresses and a few flags; a PATCH that adds
or replaces a few singular attributes (a new family name, Entra ID's ``active``, loyalty points).

``creation`` reads such a body straight into the document the storage keeps, ``patch_values`` into the
fragment of the document it sets (``SqlStorage.set_values`` merges it in). A value is plain when the model
would take it as it is: a string, boolean or integer of the attribute's type, an e-mail address already in
the form pydantic's validation gives it, a canonical value of an enumeration spelled as canonical. Any other
body (a filter, a ``remove``, a null, a reference, a date, a value needing conversion such as Entra ID's
``"False"``, an unknown attribute, two primary values...) is not plain: it goes to scim2-models as before, so
every error is still scim2-models' to word. Only read-write attributes are read; a complex attribute only if
none of its sub-attributes is required.

``tests/orchestrator/test_plain_requests.py`` runs each case both ways and holds them to the same answers,
documents and events.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, get_args

from pydantic import EmailStr, TypeAdapter, ValidationError
from pydantic_core import from_json
from scim2_models import ComplexAttribute, Mutability, Required, Resource
from scim2_models.attributes import ExtensibleStringEnum

PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
_PATCH_KEYS = frozenset({"schemas", "Operations"})
_OPERATION_KEYS = frozenset({"op", "path", "value"})
_SETS = frozenset({"add", "replace"})  # on a singular attribute, add replaces too (RFC 7644 §3.5.2.1)
_PLAIN = (str, bool, int)
_EMAIL: TypeAdapter[str] = TypeAdapter(EmailStr)


class _NotPlain(Exception):
    """The body holds something only scim2-models reads."""


Reader = Callable[[Any], Any]


def creation(model: type[Resource[Any]], body: bytes) -> dict[str, Any] | None:
    """The document a plain creation body stores, as scim2-models would dump it; None for any other body."""
    try:
        decoded = from_json(body)
    except ValueError:
        return None
    return document(model, decoded)


def document(model: type[Resource[Any]], data: Any) -> dict[str, Any] | None:
    """``creation`` of a decoded body (a Bulk operation's data)."""
    try:
        doc: dict[str, Any] = _creation_reader(model)(data)
    except _NotPlain:
        return None
    return doc


def patch_values(model: type[Resource[Any]], body: bytes) -> dict[str, Any] | None:
    """The document fragment a plain PATCH body sets, in the stored document's spelling; None when the body is
    anything else, including anything malformed."""
    try:
        decoded = from_json(body)
    except ValueError:
        return None
    if not isinstance(decoded, dict) or decoded.keys() != _PATCH_KEYS or decoded["schemas"] != [PATCH_OP]:
        return None
    operations = decoded["Operations"]
    if not isinstance(operations, list) or not operations:
        return None
    slots = _slots(model)
    fragment: dict[str, Any] = {}
    for operation in operations:
        if not isinstance(operation, dict) or operation.keys() != _OPERATION_KEYS:
            return None
        op, path, value = operation["op"], operation["path"], operation["value"]
        if not (isinstance(op, str) and op.lower() in _SETS and isinstance(path, str)):
            return None
        slot = slots.get(path.lower())
        if slot is None:
            return None
        try:
            value = slot.read(value)
        except _NotPlain:
            return None
        place = fragment
        for key in slot.keys[:-1]:
            place = place.setdefault(key, {})
        place[slot.keys[-1]] = value
    return fragment


@dataclass(frozen=True)
class Slot:
    """Where a singular attribute's value lives in a stored document, and how to read a plain one."""

    keys: tuple[str, ...]
    read: Reader


@functools.cache
def _slots(model: type[Resource[Any]]) -> dict[str, Slot]:
    """Every PATCH path (lower-cased: names and URNs are case-insensitive) that names a singular attribute of
    ``model`` with a plain value, at the top level or below a singular complex attribute with no required
    sub-attribute, of the core schema (with or without its URN) or of an extension."""
    slots: dict[str, Slot] = {}
    core = str(model.__schema__)
    for urn, holder in _schemas(model):
        prefixes = ["", core + ":"] if urn is None else [urn + ":"]
        for name, info in holder.model_fields.items():
            if (urn is None and name in holder.__scim_info__.extensions) or not _writable(holder, name):
                continue
            key = _key(info, name)
            reader = _value_reader(holder, name)
            leaves: list[tuple[tuple[str, ...], Reader]] = [((key,), reader)] if reader is not None else []
            complex_type = _complex(holder, name)
            if reader is None and complex_type is not None and not _requires(complex_type):
                for sub, sub_info in complex_type.model_fields.items():
                    sub_reader = _value_reader(complex_type, sub) if _writable(complex_type, sub) else None
                    if sub_reader is not None:
                        leaves.append(((key, _key(sub_info, sub)), sub_reader))
            for keys, leaf in leaves:
                slot = Slot(keys if urn is None else (urn, *keys), leaf)
                for prefix in prefixes:
                    slots[(prefix + ".".join(keys)).lower()] = slot
    return slots


@functools.cache
def _creation_reader(model: type[Resource[Any]]) -> Reader:
    core = str(model.__schema__)
    extensions = [urn for urn, _ in _schemas(model) if urn is not None]
    fields: dict[str, tuple[str, Reader]] = {}
    for urn, holder in _schemas(model):
        if urn is not None:
            fields[urn.lower()] = (urn, _complex_reader(holder) or _refuse)
            continue
        for name, info in holder.model_fields.items():
            reader = None if name in holder.__scim_info__.extensions else _field_reader(holder, name)
            if reader is not None:
                fields[_key(info, name).lower()] = (_key(info, name), reader)
    order = [_key(info, name) for name, info in model.model_fields.items()]
    user_name = _key(model.model_fields["user_name"], "user_name")

    def read(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _NotPlain
        schemas = value.get("schemas")
        if (
            not isinstance(schemas, list)
            or core not in schemas
            or len(set(schemas)) != len(schemas)
            or not set(schemas) <= {core, *extensions}
        ):
            raise _NotPlain
        body = _read_object(fields, {k: v for k, v in value.items() if k != "schemas"})
        if user_name not in body or not set(extensions).intersection(body) <= set(schemas):
            raise _NotPlain
        # As scim2-models dumps them: the core schema, then the extensions present, in the model's order.
        body["schemas"] = [core, *(urn for urn in extensions if urn in body)]
        return {key: body[key] for key in order if key in body}

    return read


def _schemas(model: type[Resource[Any]]) -> list[tuple[str | None, Any]]:
    """The core schema's attributes (None) and each extension's, by URN, in the model's order."""
    return [(None, model), *model.get_extension_models().items()]


def _field_reader(holder: Any, name: str) -> Reader | None:
    """How to read a value of a read-write attribute as it is; None where only scim2-models can."""
    if not _writable(holder, name, singular=False):
        return None
    complex_type = _complex(holder, name)
    if holder.get_field_multiplicity(name):
        item = _complex_reader(complex_type, complete=True) if complex_type is not None else None
        return None if item is None else functools.partial(_read_values, item)
    if complex_type is not None:
        return _complex_reader(complex_type)
    return _value_reader(holder, name)


def _value_reader(holder: Any, name: str) -> Reader | None:
    """A reader of a simple attribute's value; None for a type only scim2-models reads (references, dates,
    closed enumerations, constrained values...)."""
    kind = _value_kind(holder.model_fields[name])
    if kind is EmailStr:
        return _read_email
    if isinstance(kind, type) and issubclass(kind, ExtensibleStringEnum):
        return functools.partial(_read_canonical, frozenset(member.value for member in kind))
    return functools.partial(_read_kind, kind) if kind in _PLAIN else None


def _complex_reader(holder: Any, *, complete: bool = False) -> Reader | None:
    """A reader of a complex attribute or an extension; ``complete``: None unless every sub-attribute has
    one (an entry of a multi-valued attribute)."""
    # An extension's own "schemas" is the resource's to carry.
    subs = {name: info for name, info in holder.model_fields.items() if name != "schemas"}
    if _requires(holder):
        return None if complete else _refuse
    fields = {}
    for name, info in subs.items():
        reader = _field_reader(holder, name)
        if reader is None and complete:
            return None
        if reader is not None:
            fields[_key(info, name).lower()] = (_key(info, name), reader)
    order = [_key(info, name) for name, info in subs.items()]

    def read(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict) or not value:
            raise _NotPlain
        out = _read_object(fields, value)
        return {key: out[key] for key in order if key in out}

    return read


def _read_object(fields: dict[str, tuple[str, Reader]], value: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        known = fields.get(key.lower())
        if known is None or item is None or known[0] in out:
            raise _NotPlain
        out[known[0]] = known[1](item)
    return out


def _read_values(item: Reader, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise _NotPlain
    out = [item(entry) for entry in value]
    if sum(entry.get("primary") is True for entry in out) > 1:
        raise _NotPlain  # scim2-models words that error
    return out


def _read_kind(kind: type, value: Any) -> Any:
    if type(value) is not kind:
        raise _NotPlain
    return value


def _read_email(value: Any) -> str:
    if type(value) is not str:
        raise _NotPlain
    try:
        checked = _EMAIL.validate_python(value)
    except ValidationError:
        raise _NotPlain from None
    if checked != value:
        raise _NotPlain  # stored as pydantic normalises it: scim2-models' way does that
    return value


def _read_canonical(values: frozenset[str], value: Any) -> str:
    if type(value) is not str or value not in values:
        raise _NotPlain
    return value


def _requires(holder: Any) -> bool:
    """Whether a complex attribute or extension has a required sub-attribute (an extension's own "schemas"
    aside): setting others alone would create it without, which only scim2-models knows how to answer."""
    return any(
        holder.get_field_annotation(name, Required) == Required.true
        for name in holder.model_fields
        if name != "schemas"
    )


def _refuse(value: Any) -> Any:
    raise _NotPlain


def _key(info: Any, name: str) -> str:
    return str(info.serialization_alias or name)


def _complex(holder: Any, name: str) -> Any:
    kind = holder.get_field_root_type(name)
    return kind if isinstance(kind, type) and issubclass(kind, ComplexAttribute) else None


def _writable(holder: Any, name: str, *, singular: bool = True) -> bool:
    if holder.get_field_annotation(name, Mutability) != Mutability.read_write:
        return False
    return not (singular and holder.get_field_multiplicity(name))


def _value_kind(info: Any) -> Any:
    """The type of a field typed ``X | None`` with only SCIM characteristics beside it, else None."""
    annotation = info.annotation
    if not isinstance(annotation, UnionType) or not all(isinstance(m, enum.Enum) for m in info.metadata):
        return None
    args = get_args(annotation)
    return args[0] if len(args) == 2 and args[1] is NoneType else None
