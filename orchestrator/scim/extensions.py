"""Operator-defined User extensions: SCIM schema documents in ``IDHUB_SCHEMA_DIR``, one JSON file each.

The API serves them and the storage filters on them; the mapping and the scope filters of targets use the
same models, so an operator attribute can be sent to a target or decide its scope with no code change.
"""

from __future__ import annotations

import json
from functools import lru_cache, reduce
from operator import or_
from pathlib import Path
from typing import Any

from scim2_models import EnterpriseUser, Extension, Schema, User

from orchestrator.scim.schemas import CustomerUser


@lru_cache(maxsize=8)
def load_extension_schemas(folder: Path | None) -> tuple[type[Extension], ...]:
    """The extensions in ``folder`` (sorted by file name); one model class per folder, built once."""
    if folder is None:
        return ()
    return tuple(
        Extension.from_schema(Schema.model_validate(json.loads(path.read_text())))
        for path in sorted(folder.glob("*.json"))
    )


def user_extensions(folder: Path | None) -> list[type[Extension]]:
    """Every User extension of the hub: enterprise, customer, then the operator's."""
    return [EnterpriseUser, CustomerUser, *load_extension_schemas(folder)]


@lru_cache(maxsize=8)
def user_model(folder: Path | None) -> Any:
    """The hub's User resource with every extension (a pydantic model class)."""
    return User.__class_getitem__(reduce(or_, user_extensions(folder)))
