"""JWT verification with PyJWT: which keys, which algorithms, which claims.

The algorithm a token names in its header is only trusted after it has been
checked against the configured list, and each algorithm family draws its key
from its own source: HMAC algorithms only ever use ``auth.jwt_secret``, RSA
and EC algorithms only ever use public keys of that type. That is what keeps
``alg: none`` and HS/RS key confusion out, on top of PyJWT's own checks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bomstream.config import AuthConfig, ConfigError

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS | RSA_ALGORITHMS | frozenset(EC_CURVES)

SERVICE_ROLE = "service_role"

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class TokenRejected(Exception):
    """A token that does not verify. ``reason`` is a metric label; ``message`` is
    safe to show the client and to log (it never contains the token)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Claims:
    """What the gateway takes from a verified token."""

    org: str | None
    role: str | None
    subject: str | None
    # The moment the token stops being accepted: ``exp`` plus the leeway.
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    # The JWK's own ``alg``, when it names one: the key is then used for that alone.
    alg: str | None
    key: PublicKey


def _fits(alg: str, key: PublicKey) -> bool:
    if alg in RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    curve = EC_CURVES.get(alg)
    return (
        curve is not None
        and isinstance(key, ec.EllipticCurvePublicKey)
        and (key.curve.name == curve)
    )


def _load_pem(path: str) -> PublicKey:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(
            f"auth.jwt_public_key_file: cannot read {path} ({exc.strerror})"
        ) from None
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"auth.jwt_public_key_file: {path} is not a PEM public key") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise ConfigError(f"auth.jwt_public_key_file: {path} is neither an RSA nor an EC key")
    return key


def _load_jwks(path: str) -> list[_Key]:
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except OSError as exc:
        raise ConfigError(f"auth.jwks_file: cannot read {path} ({exc.strerror})") from None
    except ValueError:
        raise ConfigError(f"auth.jwks_file: {path} is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f'auth.jwks_file: {path} has no "keys" list')
    keys: list[_Key] = []
    for entry in doc["keys"]:
        # Symmetric secrets come from auth.jwt_secret only, never from a key set.
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC"):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK.from_dict(entry)
        except jwt.PyJWTError as exc:
            raise ConfigError(f"auth.jwks_file: unusable key in {path} ({exc})") from None
        if not isinstance(jwk.key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise ConfigError(f"auth.jwks_file: {path} holds a private key; give public keys")
        kid = entry.get("kid")
        alg = entry.get("alg")
        keys.append(
            _Key(
                kid if isinstance(kid, str) else None,
                alg if isinstance(alg, str) else None,
                jwk.key,
            )
        )
    if not keys:
        raise ConfigError(f"auth.jwks_file: {path} holds no RSA or EC signing key")
    return keys


def lookup_claim(claims: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path (``app_metadata.organization_id``), or None."""
    value: Any = claims
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


class JwtVerifier:
    """Built once from ``[auth]``; raises :class:`ConfigError` for unusable keys."""

    def __init__(self, cfg: AuthConfig) -> None:
        self._cfg = cfg
        self._secret = cfg.jwt_secret.encode()
        self._pem: PublicKey | None = (
            _load_pem(cfg.jwt_public_key_file) if cfg.jwt_public_key_file else None
        )
        self._jwks: list[_Key] = _load_jwks(cfg.jwks_file) if cfg.jwks_file else []
        self.algorithms = self._algorithms(cfg.jwt_algorithms)

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms)

    def _has_key_for(self, alg: str) -> bool:
        if alg in HMAC_ALGORITHMS:
            return bool(self._secret)
        if self._pem is not None and _fits(alg, self._pem):
            return True
        return any(_fits(alg, k.key) and k.alg in (None, alg) for k in self._jwks)

    def _algorithms(self, configured: tuple[str, ...]) -> frozenset[str]:
        if configured:
            for alg in configured:
                if alg not in SUPPORTED_ALGORITHMS:
                    raise ConfigError(
                        f"auth.jwt_algorithms: {alg!r} is not one of "
                        + ", ".join(sorted(SUPPORTED_ALGORITHMS))
                    )
                if not self._has_key_for(alg):
                    raise ConfigError(f"auth.jwt_algorithms: no key configured for {alg}")
            return frozenset(configured)
        derived = set()
        if self._secret:
            derived.add("HS256")
        named: list[tuple[str | None, PublicKey]] = [(k.alg, k.key) for k in self._jwks]
        if self._pem is not None:
            named.append((None, self._pem))
        for key_alg, key in named:
            if key_alg is not None and key_alg in SUPPORTED_ALGORITHMS and _fits(key_alg, key):
                # A JWK that names its algorithm is used for that one alone.
                derived.add(key_alg)
            elif isinstance(key, rsa.RSAPublicKey):
                derived.add("RS256")
            else:
                derived.update(a for a in EC_CURVES if _fits(a, key))
        return frozenset(derived)

    def _key_for(self, alg: str, kid: object) -> bytes | PublicKey:
        if alg in HMAC_ALGORITHMS:
            return self._secret
        usable = [k for k in self._jwks if _fits(alg, k.key) and k.alg in (None, alg)]
        if isinstance(kid, str):
            for k in usable:
                if k.kid == kid:
                    return k.key
        if self._pem is not None and _fits(alg, self._pem):
            return self._pem
        if kid is None and len(usable) == 1:
            return usable[0].key
        raise TokenRejected("unknown_key", "the token's signing key is not known")

    def verify(self, token: str) -> Claims:
        """Check signature and claims; raises :class:`TokenRejected`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed", "the token is not a valid JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenRejected("algorithm", "the token's algorithm is not accepted")
        key = self._key_for(alg, header.get("kid"))
        cfg = self._cfg
        require = ["exp"]
        if cfg.audience:
            require.append("aud")
        if cfg.issuer:
            require.append("iss")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience or None,
                issuer=cfg.issuer or None,
                leeway=cfg.leeway_s,
                options={"require": require, "verify_aud": bool(cfg.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired", "the token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad_signature", "the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected("claims", f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("claims", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("claims", "the token is from another issuer") from None
        except jwt.PyJWTError:
            raise TokenRejected("invalid", "the token is not valid") from None
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise TokenRejected("claims", "the token's 'exp' claim is not a number")
        org = lookup_claim(claims, cfg.org_claim)
        role = claims.get("role")
        sub = claims.get("sub")
        return Claims(
            # Interned: every stream of an org then shares one string.
            org=sys.intern(org) if isinstance(org, str) and org else None,
            role=role if isinstance(role, str) else None,
            subject=sub if isinstance(sub, str) else None,
            expires_at=float(exp) + cfg.leeway_s,
        )


def make_token(
    cfg: AuthConfig,
    org: str,
    *,
    subject: str = "bomstream-dev",
    ttl_s: float = 3600.0,
    role: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token the gateway accepts, for development and load tests."""
    if not cfg.jwt_secret:
        raise ConfigError("auth.jwt_secret: must be set to sign tokens")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": subject, "iat": issued, "exp": issued + int(ttl_s)}
    if cfg.audience:
        claims["aud"] = cfg.audience
    if cfg.issuer:
        claims["iss"] = cfg.issuer
    if role:
        claims["role"] = role
    # The org goes where auth.org_claim says, building nested objects as needed.
    *parents, leaf = cfg.org_claim.split(".")
    target = claims
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = org
    return jwt.encode(claims, cfg.jwt_secret, algorithm="HS256")
