"""SCIM filters and sortBy (RFC 7644 §3.4.2.2-3) as SQLAlchemy expressions on PostgreSQL and SQLite.

scim2-models parses the filter and binds its attribute paths to the models; this module only walks
that tree. Every predicate it emits is two-valued (never SQL NULL), so ``not (...)`` means what the
Python evaluator means. Known differences with the Python evaluator: SQLite's ``lower()`` folds ASCII
only, and SQLite compares JSON dateTimes to the millisecond.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from functools import cache, lru_cache
from inspect import isclass
from typing import Any

from pydantic import ValidationError
from scim2_models import (
    BaseModel,
    Extension,
    InvalidFilterException,
    InvalidPathException,
    Mutability,
    Resource,
    ScimFilter,
    SearchRequest,
    User,
)
from scim2_models.path import (
    STRING_OPERATORS,
    AttributeBinding,
    AttrPath,
    CompareOperator,
    Comparison,
    FilterNode,
    FilterVisitor,
    LogicalExpr,
    LogicalOperator,
    Not,
    Present,
    ValuePath,
    coerce_value,
)
from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Numeric,
    String,
    Table,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
)
from sqlalchemy.dialects.postgresql import TIMESTAMP

from orchestrator.db import group_members, groups, identities

MAX_FILTER_LENGTH = 4096
MAX_COMPARISONS = 50
MAX_DEPTH = 10

Bool = ColumnElement[bool]
Expr = ColumnElement[Any]
_EQUALITY = frozenset({CompareOperator.eq, CompareOperator.ne})
_OPERATORS: dict[CompareOperator, Callable[[Any, Any], Any]] = {
    CompareOperator.eq: operator.eq,
    CompareOperator.ne: operator.ne,
    CompareOperator.gt: operator.gt,
    CompareOperator.ge: operator.ge,
    CompareOperator.lt: operator.lt,
    CompareOperator.le: operator.le,
}


class _Kind(Enum):
    STRING = "string"
    NUMBER = "number"
    BOOLEAN = "boolean"
    DATETIME = "dateTime"
    BINARY = "binary"
    COMPLEX = "complex"


def _kind_of(type_: Any) -> _Kind:
    if isclass(type_):
        for base, kind in (
            (bool, _Kind.BOOLEAN),
            (int | float | Decimal, _Kind.NUMBER),
            (datetime, _Kind.DATETIME),
            (bytes, _Kind.BINARY),
            (BaseModel, _Kind.COMPLEX),
        ):
            if issubclass(type_, base):
                return kind
    # str, EmailStr, references and enums all travel as JSON strings.
    return _Kind.STRING


def _invalid(detail: str) -> InvalidFilterException:
    return InvalidFilterException(detail=detail)


# ---- parsing and the complexity bound


def parse(filter: str | FilterNode) -> FilterNode:
    """The syntax tree of a filter; InvalidFilterException (without the filter text) if bad or too complex."""
    if isinstance(filter, FilterNode):
        node = filter
    elif isinstance(filter, ScimFilter):
        node = filter.ast
    else:
        if len(filter) > MAX_FILTER_LENGTH:
            raise _invalid(f"the filter is longer than {MAX_FILTER_LENGTH} characters")
        try:
            node = ScimFilter(filter).ast
        except InvalidFilterException as exc:
            # The original carries the filter text, which may hold personal data.
            raise _invalid(exc.detail) from None
    comparisons, depth = _size(node)
    if comparisons > MAX_COMPARISONS:
        raise _invalid(f"the filter has more than {MAX_COMPARISONS} comparisons")
    if depth > MAX_DEPTH:
        raise _invalid(f"the filter nests deeper than {MAX_DEPTH} levels")
    return node


def _size(node: FilterNode) -> tuple[int, int]:
    """(comparison count, nesting depth) of a tree."""
    if isinstance(node, Comparison | Present):
        return 1, 1
    children: tuple[FilterNode, ...]
    if isinstance(node, Not):
        children = (node.expr,)
    elif isinstance(node, LogicalExpr):
        children = node.terms
    elif isinstance(node, ValuePath):
        children = (node.val_filter,)
    else:
        raise _invalid(f"unsupported filter node {type(node).__name__}")
    sizes = [_size(child) for child in children]
    return sum(s[0] for s in sizes), 1 + max(s[1] for s in sizes)


# ---- attribute resolution and operand checks


@cache
def _resolver(model: type[Resource[Any]]) -> ScimFilter[Any]:
    """A filter bound to the model, used only for its public path resolution."""
    return ScimFilter[model]("id pr")  # type: ignore[valid-type]


def _resolve(model: type[Resource[Any]], path: AttrPath, *, comparison: bool) -> AttributeBinding:
    resolver = _resolver(model)
    binding = resolver.resolve_comparison(path) if comparison else resolver.resolve(path)
    assert binding is not None
    if Mutability.write_only in (
        binding.model.get_field_annotation(binding.field_name, Mutability),
        binding.get_annotation(Mutability),
    ):
        raise _invalid(f"'{binding.urn}' is write-only and cannot be filtered")
    return binding


def _operand(binding: AttributeBinding, kind: _Kind, op: CompareOperator, value: Any) -> Any:
    """The filter value coerced to the attribute's type; invalidFilter where RFC 7644 says so."""
    if kind in (_Kind.COMPLEX, _Kind.BINARY):
        raise _invalid(f"'{binding.urn}' is {kind.value} and can only be tested with pr")
    if kind is _Kind.BOOLEAN and op not in _EQUALITY:
        raise _invalid(f"operator '{op.value}' cannot be applied to the boolean attribute '{binding.urn}'")
    if op in STRING_OPERATORS and kind is not _Kind.STRING:
        raise _invalid(
            f"operator '{op.value}' cannot be applied to the {kind.value} attribute '{binding.urn}'"
        )
    if value is None:
        if op not in _EQUALITY:
            raise _invalid(f"operator '{op.value}' needs a value, not null")
        return None
    if op in STRING_OPERATORS and not isinstance(value, str):
        raise _invalid(f"operator '{op.value}' needs a string value")
    try:
        coerced = coerce_value(binding, value, op)
    except InvalidFilterException:
        raise _invalid(f"the value compared to '{binding.urn}' is not a valid {kind.value}") from None
    if kind is _Kind.STRING:
        if not isinstance(coerced, str):
            coerced = str(coerced)
        return binding.comparable(coerced)
    if kind is _Kind.DATETIME:
        assert isinstance(coerced, datetime)
        # A dateTime without an offset is read as UTC.
        try:
            return coerced.replace(tzinfo=coerced.tzinfo or UTC).astimezone(UTC)
        except OverflowError:
            raise _invalid(f"the dateTime compared to '{binding.urn}' is out of range") from None
    if isinstance(coerced, int) and not isinstance(coerced, bool) and not -(2**63) <= coerced < 2**63:
        raise _invalid(f"the integer compared to '{binding.urn}' is out of range")
    return coerced


def _scim_name(model: Any, field: str) -> str:
    """The attribute's name in the document (``$ref`` for ``ref``)."""
    assert isclass(model)
    assert issubclass(model, BaseModel)
    return model.model_fields[field].serialization_alias or field


def _sub_keys(binding: AttributeBinding) -> tuple[str, ...]:
    sub = binding.sub_field_name
    return (_scim_name(binding.field_type, sub),) if sub else ()


# ---- dialect-specific JSON access


class _Sql:
    """The few JSON and string constructs that differ between PostgreSQL and SQLite."""

    def __init__(self, dialect: str) -> None:
        if dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported dialect {dialect}")
        self.pg = dialect == "postgresql"

    @staticmethod
    def _path(keys: tuple[str, ...]) -> str:
        # URN keys hold colons and dots: each key is quoted.
        return "$" + "".join(f'."{key}"' for key in keys)

    def scalar(self, base: Expr, keys: tuple[str, ...], kind: _Kind) -> Expr:
        """The JSON value at ``keys`` under ``base`` as a comparable SQL value, NULL when absent."""
        if self.pg:
            text: Expr = (
                func.jsonb_extract_path_text(base, *keys) if keys else base.op("#>>")(literal_column("'{}'"))
            )
            if kind is _Kind.NUMBER:
                return cast(text, Numeric)
            if kind is _Kind.BOOLEAN:
                return cast(text, Boolean)
            if kind is _Kind.DATETIME:
                return cast(text, TIMESTAMP(timezone=True))
            return text
        # json_each hands out scalars already unwrapped.
        value: Expr = func.json_extract(base, self._path(keys)) if keys else base
        if kind is _Kind.DATETIME:
            return func.strftime("%Y-%m-%dT%H:%M:%f", value)
        return value

    def datetime_operand(self, value: datetime) -> Any:
        if self.pg:
            return value
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}"

    def is_array(self, base: Expr, keys: tuple[str, ...]) -> Bool:
        type_ = (
            func.jsonb_typeof(func.jsonb_extract_path(base, *keys))
            if self.pg
            else func.json_type(base, self._path(keys))
        )
        return and_(type_.isnot(None), type_ == "array")

    def elements(self, base: Expr, keys: tuple[str, ...]) -> tuple[Any, Expr, Expr, Bool]:
        """(from clause, element value, element position, guard) for the items of a JSON array."""
        if self.pg:
            array = func.jsonb_extract_path(base, *keys)
            only_array = case((func.jsonb_typeof(array) == "array", array))
            alias = func.jsonb_array_elements(only_array).table_valued("value", with_ordinality="ordinality")
            return alias, alias.c.value, alias.c.ordinality, true()
        alias = func.json_each(base, self._path(keys)).table_valued("value", "key")
        # json_each also walks objects and scalars: only an array is a multi-valued attribute.
        return alias, alias.c.value, alias.c.key, func.json_type(base, self._path(keys)) == "array"

    def contains(self, text: Expr, part: str) -> Bool:
        return (func.strpos(text, part) if self.pg else func.instr(text, part)) > 0

    def string(self, text: Expr, order: bool) -> Expr:
        # Code point order, as Python compares strings, whatever the database's collation.
        return text.collate("C") if order and self.pg else text


# ---- where the values of an attribute come from


@dataclass(frozen=True)
class _Source:
    """How to read one attribute: a value per item, and the items when it is multi-valued."""

    binding: AttributeBinding
    kind: _Kind
    read: Callable[[Any], Expr]
    """The value of one item (the argument is None for a single-valued attribute)."""
    present: Callable[[Any], Bool]
    """Whether one item has a value in the sense of ``pr``."""
    each: Callable[[Callable[[Any], Bool]], Bool] | None = None
    """EXISTS an item satisfying a condition; None when single-valued."""
    listed: Bool | None = None
    """Whether the multi-valued attribute is there at all."""
    lowered: bool = False
    """The column already holds the lower-cased value."""
    column: bool = False
    """A real column rather than a JSON value (a dateTime column binds datetimes)."""
    member_rows: bool = False
    """The items are rows of group_members."""


def _scalar_present(value: Expr, kind: _Kind) -> Bool:
    if kind is _Kind.STRING:
        return and_(value.isnot(None), value != "")
    return value.isnot(None)


class _Scope:
    """Resolves attribute paths to sources: the row itself, one JSON array item, or one member row."""

    def source(self, path: AttrPath, *, comparison: bool) -> _Source:
        raise NotImplementedError

    def items(self, path: AttrPath) -> tuple[Callable[[Callable[[_Scope], Bool]], Bool], _Source]:
        raise _invalid("a value selection cannot be nested in another")


class _RowScope(_Scope):
    def __init__(self, model: type[Resource[Any]], table: Table, sql: _Sql) -> None:
        self.model, self.table, self.sql = model, table, sql
        self.users = "user_name_ci" in table.c
        self.doc: Expr = table.c.doc

    def _column(self, binding: AttributeBinding, column: Expr, kind: _Kind, lowered: bool = False) -> _Source:
        return _Source(
            binding,
            kind,
            lambda _: column,
            lambda _: _scalar_present(column, kind),
            lowered=lowered,
            column=True,
        )

    def _special(self, binding: AttributeBinding) -> _Source | None:
        """The indexed columns and what the hub keeps outside the document."""
        c, field, sub = self.table.c, binding.field_name, binding.sub_field_name
        if field == "id":
            return self._column(binding, c.id, _Kind.STRING)
        if field == "meta":
            if sub is None:
                return _Source(binding, _Kind.COMPLEX, _one, _true, column=True)
            columns: dict[str, tuple[Expr, _Kind]] = {
                "created": (c.created_at, _Kind.DATETIME),
                "last_modified": (c.updated_at, _Kind.DATETIME),
                "version": (literal('W/"') + cast(c.version, String) + literal('"'), _Kind.STRING),
                "resource_type": (literal("User" if self.users else "Group"), _Kind.STRING),
            }
            if sub not in columns:
                raise _invalid(f"'{binding.urn}' cannot be filtered")
            return self._column(binding, *columns[sub])
        if field == "external_id":
            return self._column(binding, c.external_id, _Kind.STRING)
        if self.users and field == "user_name":
            return self._column(binding, c.user_name_ci, _Kind.STRING, lowered=True)
        if self.users and field == "active":
            return self._column(binding, c.active, _Kind.BOOLEAN)
        if not self.users and field == "display_name":
            return self._column(binding, c.display_name_ci, _Kind.STRING, lowered=True)
        if (not self.users and field == "members") or (self.users and field == "groups"):
            return self._members(binding)
        return None

    def _members(self, binding: AttributeBinding) -> _Source:
        """Group members (or a User's groups) are rows of group_members, not part of the document."""
        gm = group_members.alias("gm")
        own = gm.c.member_id if self.users else gm.c.group_id

        def each(test: Callable[[Any], Bool]) -> Bool:
            return exists(select(literal(1)).select_from(gm).where(own == self.table.c.id, test(gm)))

        if binding.sub_field_name is None:
            return _Source(binding, _Kind.COMPLEX, _one, _true, each, each(_true), member_rows=True)
        column = _MemberScope(self.model, binding, gm, self.users).column(binding)
        return _Source(
            binding,
            _Kind.STRING,
            lambda row: column,
            lambda row: _scalar_present(column, _Kind.STRING),
            each,
            each(_true),
            member_rows=True,
        )

    def _keys(self, binding: AttributeBinding) -> tuple[str, ...]:
        prefix = (str(binding.model.__schema__),) if issubclass(binding.model, Extension) else ()
        return (*prefix, _scim_name(binding.model, binding.field_name))

    def _json_present(self, item: Expr, keys: tuple[str, ...], type_: Any, multi: bool) -> Bool:
        kind = _kind_of(type_)
        if multi:
            alias, value, _, guard = self.sql.elements(item, keys)
            inner = self._json_present(value, (), type_, False)
            return exists(select(literal(1)).select_from(alias).where(guard, inner))
        if kind is _Kind.COMPLEX:
            return or_(
                *(
                    self._json_present(
                        item,
                        (*keys, _scim_name(type_, name)),
                        type_.get_field_root_type(name),
                        bool(type_.get_field_multiplicity(name)),
                    )
                    for name in type_.model_fields
                )
            )
        return _scalar_present(self.sql.scalar(item, keys, kind), kind)

    def source(self, path: AttrPath, *, comparison: bool) -> _Source:
        binding = _resolve(self.model, path, comparison=comparison)
        special = self._special(binding)
        if special is not None:
            return special
        keys = self._keys(binding)
        kind = _kind_of(binding.target_type)
        sub_keys = _sub_keys(binding)
        if not binding.is_multivalued and binding.sub_field_name and binding.target_is_multivalued:
            # A list of simple values inside a single complex attribute (marketingPreferences.topics).
            full = (*keys, *sub_keys)
            values, value, _, listed = self.sql.elements(self.doc, full)

            def each_value(test: Callable[[Any], Bool]) -> Bool:
                return exists(select(literal(1)).select_from(values).where(listed, test(value)))

            return _Source(
                binding,
                kind,
                lambda item: self.sql.scalar(item, (), kind),
                lambda item: _scalar_present(self.sql.scalar(item, (), kind), kind),
                each_value,
                self.sql.is_array(self.doc, full),
            )
        if not binding.is_multivalued:
            full = (*keys, *sub_keys)
            return _Source(
                binding,
                kind,
                lambda _: self.sql.scalar(self.doc, full, kind),
                lambda _: self._json_present(self.doc, full, binding.target_type, False),
            )
        alias, value, _, guard = self.sql.elements(self.doc, keys)

        def each(test: Callable[[Any], Bool]) -> Bool:
            return exists(select(literal(1)).select_from(alias).where(guard, test(value)))

        return _Source(
            binding,
            kind,
            lambda item: self.sql.scalar(item, sub_keys, kind),
            lambda item: self._json_present(item, sub_keys, binding.target_type, False),
            each,
            self.sql.is_array(self.doc, keys),
        )

    def items(self, path: AttrPath) -> tuple[Callable[[Callable[[_Scope], Bool]], Bool], _Source]:
        source = self.source(path, comparison=False)
        binding = source.binding
        if not binding.is_multivalued or source.each is None:
            raise _invalid(f"'{binding.urn}' is not multi-valued and holds no values to select")
        each = source.each
        if source.member_rows:
            return lambda test: each(
                lambda gm: test(_MemberScope(self.model, binding, gm, self.users))
            ), source
        return lambda test: each(lambda item: test(_ItemScope(self, binding, item))), source


def _true(_: Any) -> Bool:
    return true()


def _one(_: Any) -> Expr:
    return literal(1)


class _ItemScope(_Scope):
    """One item of a JSON array, inside ``attr[...]``."""

    def __init__(self, row: _RowScope, outer: AttributeBinding, item: Expr) -> None:
        self.row, self.outer, self.item = row, outer, item

    def source(self, path: AttrPath, *, comparison: bool) -> _Source:
        if path.uri or path.sub_attr:
            raise _invalid(f"'{path}' is not a sub-attribute of '{self.outer.urn}'")
        sql, item = self.row.sql, self.item
        if _kind_of(self.outer.field_type) is not _Kind.COMPLEX:
            # A list of scalars is addressed as ``attr[value ...]``.
            if path.attr.lower() != "value":
                raise _invalid(f"the items of '{self.outer.urn}' are addressed as 'value'")
            kind = _kind_of(self.outer.target_type)
            return _Source(
                self.outer,
                kind,
                lambda _: sql.scalar(item, (), kind),
                lambda _: _scalar_present(sql.scalar(item, (), kind), kind),
            )
        outer = self.outer
        binding = _resolve(
            self.row.model, AttrPath(outer.field_name, path.attr, _uri(outer)), comparison=False
        )
        kind, keys = (
            _kind_of(binding.target_type),
            _sub_keys(binding),
        )
        return _Source(
            binding,
            kind,
            lambda _: sql.scalar(item, keys, kind),
            lambda _: self.row._json_present(item, keys, binding.target_type, False),
        )


def _uri(binding: AttributeBinding) -> str | None:
    return str(binding.model.__schema__) if issubclass(binding.model, Extension) else None


class _MemberScope(_Scope):
    """One row of group_members, inside ``members[...]`` (or a User's ``groups[...]``)."""

    def __init__(self, model: type[Resource[Any]], outer: AttributeBinding, gm: Any, users: bool) -> None:
        self.model, self.outer, self.gm, self.users = model, outer, gm, users

    def column(self, binding: AttributeBinding) -> Expr:
        if binding.sub_field_name == "value":
            return self.gm.c.group_id if self.users else self.gm.c.member_id  # type: ignore[no-any-return]
        if binding.sub_field_name == "type" and not self.users:
            return self.gm.c.member_type  # type: ignore[no-any-return]
        raise _invalid(f"'{binding.urn}' cannot be filtered")

    def source(self, path: AttrPath, *, comparison: bool) -> _Source:
        if path.uri or path.sub_attr:
            raise _invalid(f"'{path}' is not a sub-attribute of '{self.outer.urn}'")
        binding = _resolve(self.model, AttrPath(self.outer.field_name, path.attr), comparison=False)
        column = self.column(binding)
        return _Source(
            binding, _Kind.STRING, lambda _: column, lambda _: _scalar_present(column, _Kind.STRING)
        )


# ---- the filter walk


class _Where(FilterVisitor[Bool]):
    def __init__(self, scope: _Scope, sql: _Sql) -> None:
        self.scope, self.sql = scope, sql

    def visit_logical_expr(self, node: LogicalExpr) -> Bool:
        terms = [self.visit(term) for term in node.terms]
        return and_(*terms) if node.op == LogicalOperator.and_ else or_(*terms)

    def visit_not(self, node: Not) -> Bool:
        return not_(self.visit(node.expr))

    def visit_present(self, node: Present) -> Bool:
        source = self.scope.source(node.attr_path, comparison=False)
        if source.each is None:
            return source.present(None)
        return source.each(source.present)

    def visit_value_path(self, node: ValuePath) -> Bool:
        each, _ = self.scope.items(node.attr_path)
        return each(lambda scope: _Where(scope, self.sql).visit(node.val_filter))

    def visit_comparison(self, node: Comparison) -> Bool:
        source = self.scope.source(node.attr_path, comparison=True)
        op, each = node.op, source.each
        value = _operand(source.binding, source.kind, op, node.value)
        if value is None:
            if each is None:
                missing: Bool = source.read(None).is_(None)
            else:
                assert source.listed is not None
                missing = or_(not_(source.listed), each(lambda item: source.read(item).is_(None)))
            return missing if op == CompareOperator.eq else not_(missing)

        def holds(item: Any, op: CompareOperator) -> Bool:
            read = source.read(item)
            return and_(read.isnot(None), self._compare(source, read, op, value))

        if op == CompareOperator.ne:
            # ne on a multi-valued attribute: no item equals the value (as scim2-models reads it).
            if each is None:
                return not_(holds(None, CompareOperator.eq))
            return not_(each(lambda item: holds(item, CompareOperator.eq)))
        if each is None:
            return holds(None, op)
        return each(lambda item: holds(item, op))

    def _compare(self, source: _Source, read: Expr, op: CompareOperator, value: Any) -> Bool:
        if source.kind is _Kind.STRING:
            if not source.binding.case_exact and not source.lowered:
                read = func.lower(read)
            if op == CompareOperator.co:
                return self.sql.contains(read, value)
            if op == CompareOperator.sw:
                starts: Bool = func.substr(read, 1, len(value)) == value
                return starts
            if op == CompareOperator.ew:
                return and_(
                    func.length(read) >= len(value),
                    func.substr(read, func.length(read) - len(value) + 1) == value,
                )
            read = self.sql.string(read, op not in _EQUALITY)
        elif source.kind is _Kind.DATETIME and not source.column:
            value = self.sql.datetime_operand(value)
        compared: Bool = _OPERATORS[op](read, value)
        return compared


def where(filter: str | FilterNode, model: type[Resource[Any]], table: Table, dialect: str) -> Bool:
    """A WHERE clause selecting the rows of ``table`` that match a SCIM filter; InvalidFilterException if bad.

    ``table`` is ``identities`` (Users) or ``groups``; ``dialect`` is ``postgresql`` or ``sqlite``.
    Tombstones are not excluded: add ``deleted_at IS NULL`` yourself.
    """
    sql = _Sql(dialect)
    return _Where(_RowScope(model, table, sql), sql).visit(parse(filter))


def own_column(
    model: type[Resource[Any]], table: Table, dialect: str, attribute: str, value: str
) -> tuple[str, Any] | None:
    """For the filter ``attribute eq "value"``: the name of the column of ``table`` that ``where`` compares,
    and the value it compares it with; None where ``where`` reads anything but a column of the row as it is
    (the document, members, a column it lower-cases first) or refuses the filter.

    Identity providers match every account they provision with such a filter (``userName``,
    ``externalId``), so the hub answers it without parsing it (``orchestrator.api``)."""
    resolved = _column_source(model, table, dialect, attribute)
    if resolved is None:
        return None
    name, source = resolved
    try:
        operand = _operand(source.binding, source.kind, CompareOperator.eq, value)
    except InvalidFilterException:
        return None
    return name, operand


@lru_cache(maxsize=256)
def _column_source(
    model: type[Resource[Any]], table: Table, dialect: str, attribute: str
) -> tuple[str, _Source] | None:
    try:
        source = _RowScope(model, table, _Sql(dialect)).source(AttrPath(attribute), comparison=True)
    except (InvalidFilterException, InvalidPathException, ValueError):
        return None
    column = source.read(None) if source.column else None
    # Only where visit_comparison and _compare leave the column bare: a string column, compared as it is.
    bare = source.kind is _Kind.STRING and (source.binding.case_exact or source.lowered)
    if source.each is not None or not bare or not isinstance(column, Column) or column.table is not table:
        return None
    return column.key, source


def check(filter: str | FilterNode, model: type[Resource[Any]]) -> FilterNode:
    """The parsed filter if it is valid for ``model``; InvalidFilterException otherwise."""
    node = parse(filter)
    where(node, model, identities if issubclass(model, User) else groups, "sqlite")
    return node


def matches(filter: str | FilterNode, doc: dict[str, Any], model: type[Resource[Any]]) -> bool:
    """Whether one resource document (with id and meta) matches a filter, evaluated in Python.

    Same validation as ``where``; the evaluation is scim2-models' own. A User without ``active`` counts
    as active, as the store's ``active`` column does.
    """
    node = check(filter, model)
    if issubclass(model, User) and "active" not in doc:
        doc = {**doc, "active": True}
    resource = model.model_validate(doc)
    return bool(ScimFilter[model](node).match(resource))  # type: ignore[valid-type]


# ---- sortBy


def order_by(
    sort_by: str, descending: bool, model: type[Resource[Any]], table: Table, dialect: str
) -> list[ColumnElement[Any]]:
    """ORDER BY terms for sortBy (RFC 7644 §3.4.2.3), missing values last when ascending, then ``id``.

    InvalidPathException if the attribute is unknown or cannot be sorted on.
    """
    try:
        binding = SearchRequest[model](sort_by=sort_by).sort_binding(model)  # type: ignore[valid-type]
    except ValidationError:
        raise InvalidPathException(detail="sortBy names no attribute that can be sorted on") from None
    if binding is None:
        raise InvalidPathException(detail="sortBy names no attribute that can be sorted on")
    sql = _Sql(dialect)
    scope = _RowScope(model, table, sql)
    source = scope._special(binding)
    kind = _kind_of(binding.target_type)
    if source is not None:
        if source.each is not None:
            raise InvalidPathException(detail=f"cannot sort on '{binding.urn}'")
        value, lowered = source.read(None), source.lowered
    elif not binding.is_multivalued:
        keys = (
            *scope._keys(binding),
            *_sub_keys(binding),
        )
        value, lowered = sql.scalar(scope.doc, keys, kind), False
    else:
        value, lowered = _first_value(scope, binding, kind), False
    if kind is _Kind.STRING:
        if not binding.case_exact and not lowered:
            value = func.lower(value)
        value = sql.string(value, True)
    term = value.desc().nulls_first() if descending else value.asc().nulls_last()
    return [term, table.c.id.asc()]


def _first_value(scope: _RowScope, binding: AttributeBinding, kind: _Kind) -> Expr:
    """The value of the primary item, or else of the first one (RFC 7644 §3.4.2.3)."""
    sql = scope.sql
    alias, item, position, guard = sql.elements(scope.doc, scope._keys(binding))
    keys = _sub_keys(binding)
    query = select(sql.scalar(item, keys, kind)).select_from(alias).where(guard)
    item_type = binding.field_type
    if isclass(item_type) and issubclass(item_type, BaseModel) and "primary" in item_type.model_fields:
        primary = func.coalesce(sql.scalar(item, ("primary",), _Kind.BOOLEAN), false())
        query = query.order_by(primary.desc())
    return query.order_by(position).limit(1).scalar_subquery()
