"""Console sessions over real HTTP, on the suite's PostgreSQL and Redis: signing in
exchanges an admin key for an HttpOnly, SameSite=Strict cookie; unsafe requests need the
session's CSRF token and the console's own origin; sessions end when idle, at their
absolute end, on sign-out, everywhere for a key, and within seconds of the key's
revocation; sign-in attempts are limited; Redis holds only the session id's hash.

Each test signs in from addresses of its own (``X-Forwarded-For``, which uvicorn trusts
from 127.0.0.1 as it would from a proxy), so the per-client limit counts only its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.testing import AsyncTestClient

from app.auth.sessions import SessionStore
from app.domain.console.service import REFUSED
from app.http.sessions import COOKIE, session_cookie
from app.settings import Settings
from tests.support import PLATFORM_KEY, create_key, create_tenant, served_over_http

Client = AsyncTestClient[Litestar]
SESSION = "/console/session"
SESSION_FIELDS = {"kind", "tenant_id", "tenant_slug", "key_id", "scopes", "csrf_token",
                  "expires_at", "idle_timeout_s"}


@pytest.fixture(scope="module")
async def http(app: Litestar, client: Client) -> AsyncIterator[httpx.AsyncClient]:
    no_jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))  # Browser sends them
    async with served_over_http(app, client) as url, \
            httpx.AsyncClient(base_url=url, timeout=30, cookies=no_jar) as c:
        yield c


@pytest.fixture(scope="module")
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(settings.redis.url or "")
    yield r
    await r.aclose()


@pytest.fixture
def clock(app: Litestar) -> Iterator[list[float]]:
    """Seconds to add to the session store's clock (the app's Redis TTLs run on)."""
    store: SessionStore = app.state.console_sessions
    shift = [0.0]
    real = store.clock
    store.clock = lambda: real() + shift[0]
    yield shift
    store.clock = real


class Browser:
    """One browser: its address, its session cookie and CSRF token."""

    def __init__(self, http: httpx.AsyncClient, address: str | None = None) -> None:
        self.http = http
        self.address = address or f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.7"
        self.session_id = ""
        self.csrf = ""

    def headers(self, csrf: str | None = None, **more: str) -> dict[str, str]:
        headers = {"X-Forwarded-For": self.address, **more}
        if self.session_id:
            headers["Cookie"] = f"{COOKIE}={self.session_id}"
        if csrf:
            headers["X-CSRF-Token"] = csrf
        return headers

    async def sign_in(self, key: str, headers: dict[str, str] | None = None,
                      **body: Any) -> httpx.Response:
        """Sign in with ``key`` as JSON, or with the ``body`` given (form, bytes)."""
        resp = await self.http.post(SESSION, headers={**self.headers(), **(headers or {})},
                                    **(body or {"json": {"key": key}}))
        if resp.status_code == 201:
            self.session_id = SimpleCookie(resp.headers["set-cookie"])[COOKIE].value
            self.csrf = resp.json()["csrf_token"]
        return resp

    async def who(self) -> httpx.Response:
        return await self.http.get(SESSION, headers=self.headers())

    async def unsafe(self, method: str, path: str, csrf: str | None = None,
                     **headers: str) -> httpx.Response:
        return await self.http.request(method, path, headers=self.headers(csrf, **headers))


async def admin_key(client: Client, admin_headers: dict[str, str], tenant_id: str | None = None,
                    scopes: tuple[str, ...] = ("admin",)) -> tuple[str, dict[str, Any]]:
    """A key (and its JSON) of a new tenant, or of ``tenant_id``."""
    if tenant_id is None:
        tenant_id = (await create_tenant(client, admin_headers))["id"]
    made = await create_key(client, admin_headers, tenant_id, list(scopes))
    return made["key"], made


async def test_signing_in_sets_a_strict_http_only_cookie_and_stores_only_a_hash(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
    settings: Settings, redis: aioredis.Redis,
) -> None:
    key, made = await admin_key(client, admin_headers, scopes=("admin", "chat"))
    browser = Browser(http)
    resp = await browser.sign_in(key)
    assert resp.status_code == 201, resp.text
    cookies = resp.headers.get_list("set-cookie")
    assert len(cookies) == 1
    parts = [p.strip() for p in cookies[0].split(";")]
    assert parts[0] == f"{COOKIE}={browser.session_id}" and len(browser.session_id) >= 43
    assert {p.lower() for p in parts[1:]} == {"httponly", "path=/console", "samesite=strict"}
    body = resp.json()
    assert set(body) == SESSION_FIELDS
    assert (body["kind"], body["key_id"], body["scopes"]) == ("tenant", made["id"],
                                                             ["admin", "chat"])
    assert body["idle_timeout_s"] == settings.console.session_idle_s
    secret = key.split("_", 2)[2]
    assert secret not in resp.text and browser.session_id not in resp.text

    who = await browser.who()
    assert who.status_code == 200, who.text
    assert who.json()["tenant_id"] == body["tenant_id"] and who.json()["csrf_token"] == \
        browser.csrf

    # Redis holds the id's SHA-256 only, and never the key; the idle TTL is set.
    digest = hashlib.sha256(browser.session_id.encode()).hexdigest()
    stored = f"{settings.worker.namespace}:console:session:{digest}"
    assert 0 < await redis.pttl(stored) <= settings.console.session_idle_s * 1000
    async for name in redis.scan_iter(f"{settings.worker.namespace}:console:*"):
        kind = await redis.type(name)
        value = await redis.get(name) if kind in (b"string", "string") else b""
        for text in (name, value or b""):
            assert browser.session_id.encode() not in text and secret.encode() not in text
    # Outside dev and test the cookie is Secure too (the route passes is_production).
    assert "Secure" in session_cookie("x", secure=True).to_header()


async def test_form_sign_in_and_bad_bodies(http: httpx.AsyncClient, client: Client,
                                           admin_headers: dict[str, str]) -> None:
    key, _ = await admin_key(client, admin_headers)
    browser = Browser(http)
    resp = await browser.sign_in(key, data={"key": key, "submit": "Sign in"})
    assert resp.status_code == 201, resp.text
    assert (await browser.who()).status_code == 200
    bad: list[dict[str, Any]] = [
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        {"json": {}}, {"json": []}, {"json": {"key": ""}}, {"json": {"key": 5}},
        {"data": {"other": "x"}}, {"files": {"key": ("key.txt", key.encode())}}]
    for kwargs in bad:
        resp = await Browser(http).sign_in(key, **kwargs)
        assert resp.status_code == 400, (kwargs, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
        assert key not in resp.text


async def test_refused_sign_ins_never_say_whether_the_key_exists(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    chat_key, _ = await admin_key(client, admin_headers, tenant["id"], ("chat", "ingest"))
    revoked, made = await admin_key(client, admin_headers, tenant["id"])
    resp = await client.delete(f"/admin/tenants/{tenant['id']}/keys/{made['id']}",
                               headers=admin_headers)
    assert resp.status_code == 200, resp.text
    made_up = "trk_abcdefghijkl_" + "x" * 43
    for key in (chat_key, revoked, made_up, "not a key", chat_key[:-1] + "A"):
        resp = await Browser(http).sign_in(key)
        assert resp.status_code == 401, (key, resp.text)
        assert resp.json()["detail"] == REFUSED and "set-cookie" not in resp.headers
    operator = await Browser(http).sign_in(PLATFORM_KEY)
    assert operator.status_code == 201, operator.text
    assert (operator.json()["kind"], operator.json()["tenant_id"]) == ("operator", None)


async def test_unsafe_requests_need_the_csrf_token_and_the_console_origin(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
) -> None:
    key, _ = await admin_key(client, admin_headers)
    browser = Browser(http)
    assert (await browser.sign_in(key)).status_code == 201
    for csrf in (None, "wrong-token", browser.csrf[:-1]):
        resp = await browser.unsafe("DELETE", SESSION, csrf)
        assert resp.status_code == 403, resp.text
        assert resp.json()["code"] == "csrf_failed"
    own = str(http.base_url).rstrip("/")
    for refused in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Origin": own.replace("127.0.0.1", "localhost")},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        resp = await browser.unsafe("DELETE", SESSION, browser.csrf, **refused)
        assert resp.status_code == 403, (refused, resp.text)
        assert resp.json()["code"] == "csrf_failed"
        login = await Browser(http).sign_in(key, headers={"X-Forwarded-For": "10.9.9.9",
                                                          **refused})
        assert login.status_code == 403, (refused, login.text)  # no login CSRF either
    # A cross-site page cannot read who is signed in either (a top-level link may go).
    assert (await http.get(SESSION, headers=browser.headers(
        Origin="https://evil.example"))).status_code == 403
    assert (await http.get(SESSION, headers=browser.headers(
        **{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}))).status_code == 200
    assert (await browser.who()).status_code == 200  # none of that signed it out
    # The right token, from the console's own page: signed out.
    resp = await browser.unsafe("DELETE", SESSION, browser.csrf, Origin=own,
                                **{"Sec-Fetch-Site": "same-origin"})
    assert resp.status_code == 204, resp.text
    assert (await browser.who()).status_code == 401


async def test_the_csrf_token_may_come_as_a_form_field(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
) -> None:
    key, _ = await admin_key(client, admin_headers)
    browser = Browser(http)
    assert (await browser.sign_in(key)).status_code == 201
    resp = await http.post(f"{SESSION}/end-all", headers=browser.headers(),
                           data={"csrf_token": "wrong"})
    assert resp.status_code == 403, resp.text
    resp = await http.post(f"{SESSION}/end-all", headers=browser.headers(),
                           data={"csrf_token": browser.csrf})
    assert resp.status_code == 200 and resp.json() == {"ended": 1}, resp.text


async def test_a_session_ends_when_idle_and_at_its_absolute_end(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
    settings: Settings, redis: aioredis.Redis, clock: list[float],
) -> None:
    idle, most = settings.console.session_idle_s, settings.console.session_max_s
    key, _ = await admin_key(client, admin_headers)
    idler, busy = Browser(http), Browser(http)
    assert (await idler.sign_in(key)).status_code == 201
    clock[0] += idle - 60  # used within the idle time: still signed in, and refreshed
    assert (await idler.who()).status_code == 200
    clock[0] += idle - 60
    assert (await idler.who()).status_code == 200
    clock[0] += idle + 1  # unused for longer: ended, and gone from Redis
    assert (await idler.who()).status_code == 401
    digest = hashlib.sha256(idler.session_id.encode()).hexdigest()
    assert not await redis.exists(f"{settings.worker.namespace}:console:session:{digest}")

    clock[0] = 0
    assert (await busy.sign_in(key)).status_code == 201
    while clock[0] + idle // 2 < most:  # used every half idle time...
        clock[0] += idle // 2
        assert (await busy.who()).status_code == 200, clock[0]
    clock[0] = most + 1  # ...but not past its absolute end
    resp = await busy.who()
    assert resp.status_code == 401 and resp.json()["code"] == "unauthenticated"


async def test_sign_out_ends_this_session_and_end_all_every_session_of_the_key(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    key, _ = await admin_key(client, admin_headers, tenant["id"])
    other_key, _ = await admin_key(client, admin_headers, tenant["id"])
    a, b, c, other = Browser(http), Browser(http), Browser(http), Browser(http)
    for browser, k in ((a, key), (b, key), (c, key), (other, other_key)):
        assert (await browser.sign_in(k)).status_code == 201
    resp = await a.unsafe("DELETE", SESSION, a.csrf)
    assert resp.status_code == 204, resp.text
    cleared = resp.headers["set-cookie"].lower()
    assert f"{COOKIE}=" in cleared and "max-age=0" in cleared and "path=/console" in cleared
    assert (await a.who()).status_code == 401 and (await b.who()).status_code == 200
    resp = await b.unsafe("POST", f"{SESSION}/end-all", b.csrf)
    assert resp.status_code == 200 and resp.json() == {"ended": 2}, resp.text
    assert (await b.who()).status_code == 401 and (await c.who()).status_code == 401
    assert (await other.who()).status_code == 200  # another key's session stays
    # Signing in again in a browser ends the session it had.
    previous = other.session_id
    assert (await other.sign_in(other_key)).status_code == 201
    stale = Browser(http, other.address)
    stale.session_id = previous
    assert (await stale.who()).status_code == 401 and (await other.who()).status_code == 200


async def test_revoking_the_key_or_suspending_the_tenant_ends_its_sessions(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
) -> None:
    tenant = await create_tenant(client, admin_headers)
    key, made = await admin_key(client, admin_headers, tenant["id"])
    browser = Browser(http)
    assert (await browser.sign_in(key)).status_code == 201
    assert (await browser.who()).status_code == 200  # the key is in the credential cache
    resp = await http.delete(f"/admin/tenants/{tenant['id']}/keys/{made['id']}",
                             headers=admin_headers)
    assert resp.status_code == 200, resp.text
    revoked_at = time.monotonic()
    while (resp := await browser.who()).status_code == 200:
        assert time.monotonic() - revoked_at < 3, "the revoked key's session still works"
        await asyncio.sleep(0.1)
    assert resp.status_code == 401, resp.text
    assert (await browser.who()).status_code == 401  # ended, not only refused

    key, _ = await admin_key(client, admin_headers, tenant["id"])
    assert (await browser.sign_in(key)).status_code == 201
    resp = await http.post(f"/admin/tenants/{tenant['id']}/suspend", headers=admin_headers)
    assert resp.status_code == 200, resp.text
    resp = await browser.who()
    assert resp.status_code == 403 and resp.json()["code"] == "tenant_suspended", resp.text
    assert (await browser.who()).status_code == 401


async def test_the_eleventh_sign_in_attempt_in_a_minute_is_429(
    http: httpx.AsyncClient, client: Client, admin_headers: dict[str, str],
    settings: Settings,
) -> None:
    limit = settings.console.signin_per_minute
    key, _ = await admin_key(client, admin_headers)
    browser = Browser(http)
    for _ in range(limit):
        assert (await browser.sign_in("trk_zzzzzzzzzzzz_" + "y" * 43)).status_code == 401
    for attempt in ("trk_zzzzzzzzzzzz_" + "y" * 43, key):  # even the right key, from there
        resp = await browser.sign_in(attempt)
        assert resp.status_code == 429, resp.text
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["code"] == "rate_limited"
    assert (await Browser(http).sign_in(key)).status_code == 201  # another client may

    # Per key prefix: from as many addresses, the prefix's 11th attempt is refused.
    prefix = key.split("_")[1]
    for _ in range(limit - 1):  # (the right key counted once already)
        resp = await Browser(http).sign_in(f"trk_{prefix}_" + "w" * 43)
        assert resp.status_code == 401, resp.text
    resp = await Browser(http).sign_in(key)
    assert resp.status_code == 429 and "retry-after" in resp.headers, resp.text
