"""Which BOMs a multi-BOM request names: ``?bom_id=A&bom_id=B...`` or ``?scope=org``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from multidict import MultiMapping

from bomstream.errors import ApiError
from bomstream.events import is_valid_bom_id
from bomstream.tickets import Grant

ORG_SCOPE = "org"


@dataclass(frozen=True, slots=True)
class Selection:
    # None: every BOM the caller may see (scope=org).
    boms: tuple[str, ...] | None

    @property
    def grant(self) -> Grant:
        if self.boms is None:
            return Grant(org_scope=True)
        return Grant(frozenset(self.boms))


def checked_ids(ids: Sequence[object], max_boms: int) -> tuple[str, ...]:
    """A list of BOM ids, as a stream, a poll and a ticket take it."""
    if not ids:
        raise ApiError(400, "missing_bom_id", "name at least one bom_id, or scope=org")
    if len(ids) > max_boms:
        raise ApiError(400, "too_many_boms", f"at most {max_boms} bom_id values per request")
    seen: set[str] = set()
    for bom_id in ids:
        if not isinstance(bom_id, str) or not is_valid_bom_id(bom_id):
            raise ApiError(
                400,
                "invalid_bom_id",
                "every bom_id must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
            )
        if bom_id in seen:
            raise ApiError(400, "duplicate_bom_id", "a bom_id is listed more than once")
        seen.add(bom_id)
    return tuple(ids)  # type: ignore[arg-type]  # checked above: every one a str


def from_query(query: MultiMapping[str], max_boms: int) -> Selection:
    ids = query.getall("bom_id", [])
    scope = query.get("scope")
    if scope is not None:
        if scope != ORG_SCOPE or ids:
            raise ApiError(
                400, "invalid_scope", "scope must be 'org', and cannot be combined with bom_id"
            )
        return Selection(None)
    return Selection(checked_ids(ids, max_boms))
