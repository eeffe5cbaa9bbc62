"""Who is asking: the outcome of authentication, used by the broker for scoping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["open", "admin", "jwt", "ticket"]
    # The only org whose events this caller may see; None means every org.
    org: str | None
    can_publish: bool = False
    # Seconds since the epoch after which an open stream must end (JWT ``exp``).
    expires_at: float | None = None
    subject: str | None = None


OPEN = Principal(kind="open", org=None, can_publish=True)
ADMIN = Principal(kind="admin", org=None, can_publish=True)
