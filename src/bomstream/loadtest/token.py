"""HS256 tokens for load tests, signed with the configured secret.

The org goes at the dotted ``auth.org_claim`` path, exactly where the
gateway reads it, so a minted token is what a real caller would present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt


def claims_for(
    org: str, org_claim: str, subject: str, ttl_s: float, **extra: Any
) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl_s)}
    claims.update(extra)
    node = claims
    *parents, leaf = org_claim.split(".")
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = node[name] = {}
        node = child
    node[leaf] = org
    return claims


def mint_token(
    secret: str, org_claim: str, org: str, *, subject: str, ttl_s: float, **extra: Any
) -> str:
    if not secret:
        raise ValueError("auth.jwt_secret is not configured; cannot mint a token")
    return jwt.encode(claims_for(org, org_claim, subject, ttl_s, **extra), secret, "HS256")


@dataclass(frozen=True, slots=True)
class TokenMint:
    """How to sign one JWT per stream; plain data, so a worker process can do it too."""

    secret: str
    org_claim: str
    org: str
    ttl_s: float

    def for_stream(self, number: int) -> str:
        return mint_token(
            self.secret, self.org_claim, self.org, subject=f"loadtest-{number}", ttl_s=self.ttl_s
        )
