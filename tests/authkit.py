"""Keys and tokens for auth tests: real RSA/EC keys, real PyJWT signatures."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
ADMIN = "admin-token-for-tests-0123456789"


@dataclass
class KeyPair:
    private: Any
    kid: str

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self, alg: str) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(alg)
        data = json.loads(algo.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "use": "sig", "alg": alg})
        return dict(data)


def rsa_pair(kid: str = "rsa-1") -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid)


def ec_pair(kid: str = "ec-1") -> KeyPair:
    return KeyPair(ec.generate_private_key(ec.SECP256R1()), kid)


def write_jwks(path: Path, entries: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"keys": entries}))
    return str(path)


def write_pem(path: Path, pair: KeyPair) -> str:
    path.write_bytes(pair.public_pem)
    return str(path)


def claims(org: str | None = "org-a", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + int(ttl)}
    if org is not None:
        out["organization_id"] = org
    out.update(extra)
    return out


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def org_token(org: str = "org-a", **extra: Any) -> str:
    return hs256(claims(org, **extra))


def signed(payload: dict[str, Any], pair: KeyPair, alg: str, kid: str | None = "default") -> str:
    headers = {"kid": pair.kid if kid == "default" else kid} if kid is not None else None
    return jwt.encode(payload, pair.private, algorithm=alg, headers=headers)
