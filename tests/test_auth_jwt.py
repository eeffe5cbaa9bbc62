"""JWT and admin-token authentication (spec section 5) against a real gateway."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from bomstream.server import RunningGateway
from tests.authkit import (
    ADMIN,
    SECRET,
    claims,
    ec_pair,
    hs256,
    org_token,
    rsa_pair,
    signed,
    write_jwks,
    write_pem,
)
from tests.cli_proc import run_cli
from tests.conftest import StartGateway, open_stream, progress, publish

STREAM = "/api/enrichment/stream/bom-a"


async def status_of(
    http: aiohttp.ClientSession, url: str, token: str | None, *, query: bool = False
) -> int:
    headers = {}
    if token is not None and not query:
        headers["Authorization"] = f"Bearer {token}"
    params = {"token": token} if token is not None and query else None
    async with http.get(url, headers=headers, params=params) as resp:
        if resp.status != 200 or resp.content_type != "text/event-stream":
            body = await resp.json()
            assert set(body) == {"error", "code"}
        return resp.status


async def hs_gateway(gateway_factory: StartGateway, **extra: Any) -> RunningGateway:
    return await gateway_factory(auth__jwt_secret=SECRET, auth__admin_token=ADMIN, **extra)


async def test_hs256_token_opens_stream_from_header_or_query(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory)
    token = org_token("org-a")
    assert await status_of(http, gw.url + STREAM, token) == 200
    assert await status_of(http, gw.url + STREAM, token, query=True) == 200
    assert await status_of(http, gw.url + STREAM, ADMIN) == 200


async def test_missing_malformed_forged_or_expired_token_is_401(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory, auth__leeway_s=0)
    expired = hs256(claims("org-a", ttl=-10))
    forged = hs256(claims("org-a"), secret="another-secret-0123456789-abcdefghijklmnop")
    good = org_token("org-a")
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for token in (None, "not-a-jwt", "a.b.c", expired, forged, tampered, ADMIN + "x"):
        assert await status_of(http, gw.url + STREAM, token) == 401, token
    async with http.get(gw.url + STREAM) as resp:
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    async with http.get(gw.url + "/metrics") as resp:
        text = await resp.text()
    for reason in ("missing", "malformed", "expired", "bad_signature"):
        assert f'bomstream_auth_failures_total{{reason="{reason}"}}' in text, reason


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


async def test_alg_none_is_rejected(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory)
    body = _b64(claims("org-a"))
    for alg in ("none", "None", "NONE"):
        token = f"{_b64({'alg': alg, 'typ': 'JWT'})}.{body}."
        assert await status_of(http, gw.url + STREAM, token) == 401
    # The same claims, properly signed, are accepted: the refusal is the algorithm.
    assert await status_of(http, gw.url + STREAM, hs256(claims("org-a"))) == 200


async def test_hmac_signed_with_the_public_key_is_rejected(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The classic RS/HS confusion: an attacker signs HS256 with the server's
    public key as the HMAC secret. HMAC only ever uses auth.jwt_secret."""
    pair = rsa_pair()
    pem = write_pem(tmp_path / "pub.pem", pair)
    gw = await gateway_factory(
        auth__jwt_secret=SECRET,
        auth__jwt_public_key_file=pem,
        auth__jwt_algorithms=["HS256", "RS256"],
    )
    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64(claims("org-a"))
    sig = hmac.new(pair.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    assert await status_of(http, gw.url + STREAM, forged) == 401
    assert await status_of(http, gw.url + STREAM, signed(claims("org-a"), pair, "RS256")) == 200
    assert await status_of(http, gw.url + STREAM, org_token("org-a")) == 200


async def test_only_configured_algorithms_are_accepted(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pair = rsa_pair()
    pem = write_pem(tmp_path / "pub.pem", pair)
    gw = await gateway_factory(
        auth__jwt_secret=SECRET, auth__jwt_public_key_file=pem, auth__jwt_algorithms=["RS256"]
    )
    assert await status_of(http, gw.url + STREAM, org_token("org-a")) == 401
    assert await status_of(http, gw.url + STREAM, signed(claims("org-a"), pair, "RS384")) == 401
    assert await status_of(http, gw.url + STREAM, signed(claims("org-a"), pair, "RS256")) == 200


async def test_rs256_and_es256_with_pem_public_keys(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rsa_key, ec_key = rsa_pair(), ec_pair()
    rs_gw = await gateway_factory(auth__jwt_public_key_file=write_pem(tmp_path / "r.pem", rsa_key))
    es_gw = await gateway_factory(auth__jwt_public_key_file=write_pem(tmp_path / "e.pem", ec_key))
    rs_token = signed(claims("org-a"), rsa_key, "RS256", kid=None)
    es_token = signed(claims("org-a"), ec_key, "ES256", kid=None)
    assert await status_of(http, rs_gw.url + STREAM, rs_token) == 200
    assert await status_of(http, es_gw.url + STREAM, es_token) == 200
    # Each gateway knows its own key type only.
    assert await status_of(http, rs_gw.url + STREAM, es_token) == 401
    assert await status_of(http, es_gw.url + STREAM, rs_token) == 401
    other = rsa_pair()
    assert await status_of(http, rs_gw.url + STREAM, signed(claims(), other, "RS256")) == 401


async def test_jwks_key_is_chosen_by_kid(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    r1, r2, e1 = rsa_pair("r1"), rsa_pair("r2"), ec_pair("e1")
    jwks = write_jwks(tmp_path / "jwks.json", [r1.jwk("RS256"), r2.jwk("RS256"), e1.jwk("ES256")])
    gw = await gateway_factory(auth__jwks_file=jwks)
    for pair, alg in ((r1, "RS256"), (r2, "RS256"), (e1, "ES256")):
        assert await status_of(http, gw.url + STREAM, signed(claims(), pair, alg)) == 200
    # Signed by r1 but claiming to be r2: r2's key does not verify it.
    assert await status_of(http, gw.url + STREAM, signed(claims(), r1, "RS256", kid="r2")) == 401
    assert await status_of(http, gw.url + STREAM, signed(claims(), r1, "RS256", kid="nope")) == 401
    # With several keys a token must say which one.
    assert await status_of(http, gw.url + STREAM, signed(claims(), r1, "RS256", kid=None)) == 401


async def test_exp_is_required(gateway_factory: StartGateway, http: aiohttp.ClientSession) -> None:
    gw = await hs_gateway(gateway_factory)
    no_exp = claims("org-a")
    del no_exp["exp"]
    assert await status_of(http, gw.url + STREAM, hs256(no_exp)) == 401


async def test_audience_and_issuer_are_checked_when_configured(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory, auth__audience="bomstream", auth__issuer="https://idp")
    good = claims("org-a", aud="bomstream", iss="https://idp")
    assert await status_of(http, gw.url + STREAM, hs256(good)) == 200
    for bad in (
        claims("org-a", aud="other", iss="https://idp"),
        claims("org-a", aud="bomstream", iss="https://evil"),
        claims("org-a", iss="https://idp"),
        claims("org-a", aud="bomstream"),
    ):
        assert await status_of(http, gw.url + STREAM, hs256(bad)) == 401, bad
    # Without an audience configured, a token's aud (Supabase: "authenticated") is ignored.
    plain = await hs_gateway(gateway_factory)
    assert await status_of(http, plain.url + STREAM, hs256(claims(aud="authenticated"))) == 200


async def test_leeway_allows_small_clock_skew_only(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    lenient = await hs_gateway(gateway_factory, auth__leeway_s=60)
    strict = await hs_gateway(gateway_factory, auth__leeway_s=0)
    just_expired = hs256(claims("org-a", ttl=-5))
    assert await status_of(http, lenient.url + STREAM, just_expired) == 200
    assert await status_of(http, strict.url + STREAM, just_expired) == 401
    long_expired = hs256(claims("org-a", ttl=-120))
    assert await status_of(http, lenient.url + STREAM, long_expired) == 401


async def test_org_claim_is_a_dotted_path(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory, auth__org_claim="app_metadata.organization_id")
    supabase_like = claims(None, role="authenticated", app_metadata={"organization_id": "org-a"})
    token = hs256(supabase_like)
    await publish(http, gw.url, "bom-a", progress("bom-a", 1, organization_id="org-a"), token=ADMIN)
    async with open_stream(http, gw.url, "bom-a", token=token) as s:
        assert (await s.next_event()).event == "connected"
        assert (await s.next_event()).id == "bom-a-e1"
    # The top-level claim is not the org under this setting.
    assert await status_of(http, gw.url + STREAM, hs256(claims("org-a"))) == 403


async def test_token_without_org_claim_is_403(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory)
    assert await status_of(http, gw.url + STREAM, hs256(claims(None))) == 403
    assert await status_of(http, gw.url + STREAM, hs256(claims(""))) == 403
    async with http.get(
        gw.url + "/api/enrichment/events/bom-a",
        headers={"Authorization": f"Bearer {hs256(claims(None))}"},
    ) as resp:
        assert resp.status == 403


async def test_only_service_role_jwt_or_admin_may_publish(
    gateway_factory: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await hs_gateway(gateway_factory)
    event = progress("bom-a", 1, organization_id="org-a")
    await publish(http, gw.url, "bom-a", event, token=org_token("org-a"), expect=403)
    await publish(
        http, gw.url, "bom-a", event, token=org_token("org-a", role="authenticated"), expect=403
    )
    await publish(http, gw.url, "bom-a", event, token=None, expect=401)
    service = hs256(claims(None, role="service_role"))
    assert await publish(http, gw.url, "bom-a", event, token=service) == {"event_id": "bom-a-e1"}
    await publish(http, gw.url, "bom-a", progress("bom-a", 2), token=ADMIN)
    # A service token bound to one org publishes that org's events only.
    scoped = org_token("org-b", role="service_role")
    await publish(
        http, gw.url, "bom-b", progress("bom-b", 1, organization_id="org-b"), token=scoped
    )
    await publish(
        http, gw.url, "bom-b", progress("bom-b", 2, organization_id="org-a"), token=scoped,
        expect=403,
    )  # fmt: skip


async def test_cli_token_is_accepted_by_the_gateway(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[auth]\njwt_secret = "{SECRET}"\norg_claim = "app_metadata.organization_id"\n')
    out = await asyncio.to_thread(
        run_cli,
        "token", "--config", str(cfg), "--org", "org-a",
        "--sub", "loadtest-7", "--ttl", "120", "--role", "service_role",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert decoded["app_metadata"] == {"organization_id": "org-a"}
    assert decoded["sub"] == "loadtest-7"
    assert decoded["role"] == "service_role"
    assert 110 <= decoded["exp"] - time.time() <= 121
    gw = await hs_gateway(gateway_factory, auth__org_claim="app_metadata.organization_id")
    assert await status_of(http, gw.url + STREAM, token) == 200
    await publish(http, gw.url, "bom-a", progress("bom-a", 1, organization_id="org-a"), token=token)


def test_cli_token_without_secret_exits_2_with_one_line(tmp_path: Path) -> None:
    out = run_cli("token", "--org", "org-a", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1
    assert "auth.jwt_secret" in out.stderr


async def test_a_jwk_that_names_its_algorithm_is_used_for_that_one_only(
    gateway_factory: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pss = rsa_pair("pss")
    gw = await gateway_factory(auth__jwks_file=write_jwks(tmp_path / "j.json", [pss.jwk("PS256")]))
    assert await status_of(http, gw.url + STREAM, signed(claims(), pss, "PS256")) == 200
    assert await status_of(http, gw.url + STREAM, signed(claims(), pss, "RS256")) == 401
