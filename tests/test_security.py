"""Security of the connection and of the data: TLS, ACL users, namespaces, HMAC-signed entries.

TLS runs against a redis-server listening only on its TLS port, with a CA and
certificates made in the test; ACL users are made on a private server. Both go
through ``Cache.from_url``, as an application would.
"""

from __future__ import annotations

import datetime as dt
import inspect
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import test_engine
from helpers import entry_field, users
from redis.exceptions import NoPermissionError

from devtools.devservers import RedisServer
from swr_cache import (
    Cache,
    ConfigError,
    InvalidationError,
    StreamInvalidator,
    cached,
    item_tag,
)
from swr_cache._entry import expand
from swr_cache._signing import M_SIG, Signer
from swr_cache._store import M_ENTRY
from swr_cache.testing import CacheHost, FakeClock, RecordingOrigin

pytestmark = pytest.mark.redis

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


async def exercise(cache: Cache) -> None:
    """Every kind of Redis call the engine makes: fill, hit, projection merge, tags, invalidation."""
    origin = RecordingOrigin({"u1": {"pk": "u1", "name": "Ada", "age": Decimal(36)}})
    get_user = users(cache, origin)

    @cached(cache, key="n:{x}", tags=lambda x: [item_tag("Users", {"pk": x})])
    async def name_of(x: str) -> str:
        return str((await origin.get(x))["name"])  # type: ignore[index]

    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert await get_user("u1", attributes=["name", "age"]) == {"name": "Ada", "age": Decimal(36)}
    assert await get_user("u1") == origin.items["u1"]
    assert await name_of("u1") == "Ada"
    calls = origin.count
    assert await get_user("u1") == origin.items["u1"]
    assert await name_of("u1") == "Ada"
    assert origin.count == calls
    await cache.invalidate_item("Users", {"pk": "u1"})
    assert await get_user.peek("u1") is None
    assert await name_of.peek("u1") is None
    stats = cache.stats()
    assert stats[get_user.name]["redis_errors"] == 0 and stats[get_user.name]["bypasses"] == 0


# --- TLS ---------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and the certificates it issued, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _write_pki(directory: Path) -> Pki:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return path

    def save_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        return key, cert

    def issue(
        ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("swr_cache test CA")
    server_key, server_cert = issue(ca_key, ca_cert, "127.0.0.1", server=True)
    client_key, client_cert = issue(ca_key, ca_cert, "swr_cache test client", server=False)
    _, other_ca = make_ca("swr_cache unrelated CA")
    return Pki(
        ca=save_cert(ca_cert, directory / "ca.pem"),
        server_cert=save_cert(server_cert, directory / "server.pem"),
        server_key=save_key(server_key, directory / "server.key"),
        client_cert=save_cert(client_cert, directory / "client.pem"),
        client_key=save_key(client_key, directory / "client.key"),
        other_ca=save_cert(other_ca, directory / "other-ca.pem"),
    )


class TlsRedisServer(RedisServer):
    """A redis-server that listens only on a TLS port (``--port 0``), on the port it picked."""

    def __init__(self, pki: Pki, *, require_client_cert: bool) -> None:
        super().__init__()
        self.pki = pki
        self.require_client_cert = require_client_cert

    def _argv(self) -> list[str]:
        return [
            *super()._argv(),
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.pki.server_cert),
            "--tls-key-file", str(self.pki.server_key),
            "--tls-ca-cert-file", str(self.pki.ca),
            "--tls-auth-clients", "yes" if self.require_client_cert else "no",
        ]  # fmt: skip

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return context

    def ping(self, timeout: float = 0.5) -> bool:
        """PING over TLS (there is no plain port to ask)."""
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=timeout) as raw,
                self._context().wrap_socket(raw, server_hostname=self.host) as sock,
            ):
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except (OSError, ssl.SSLError):
            return False

    def plain_port_refused(self) -> bool:
        """Whether a plaintext client gets no Redis reply on the TLS port."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return not sock.recv(16).startswith(b"+PONG")
        except OSError:
            return True

    def tls_url(self, *, ca: Path | None = None, client_cert: bool = False, user: str = "") -> str:
        query = [f"ssl_ca_certs={ca or self.pki.ca}"]
        if client_cert:
            query += [f"ssl_certfile={self.pki.client_cert}", f"ssl_keyfile={self.pki.client_key}"]
        auth = f"{user}@" if user else ""
        return f"rediss://{auth}{self.host}:{self.port}/0?{'&'.join(query)}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _write_pki(tmp_path_factory.mktemp("pki"))


def _start_tls(pki: Pki, require_client_cert: bool) -> TlsRedisServer:
    server = TlsRedisServer(pki, require_client_cert=require_client_cert)
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        text = str(exc).lower()
        if "tls" in text and (
            "bad directive" in text or "not supported" in text or "support" in text
        ):
            pytest.skip(f"this redis-server was built without TLS support: {exc}")
        raise
    return server


@pytest.fixture(scope="module")
def tls_redis(pki: Pki) -> Iterator[TlsRedisServer]:
    """A TLS-only redis-server (client certificates optional)."""
    server = _start_tls(pki, require_client_cert=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def mtls_redis(pki: Pki) -> Iterator[TlsRedisServer]:
    """A TLS-only redis-server that requires a client certificate from our CA."""
    server = _start_tls(pki, require_client_cert=True)
    try:
        yield server
    finally:
        server.close()


async def test_rediss_url_with_a_private_ca(tls_redis: TlsRedisServer) -> None:
    """``rediss://`` with the CA of a self-signed PKI: every engine operation works over TLS only."""
    assert tls_redis.plain_port_refused()
    cache = Cache.from_url(tls_redis.tls_url(), namespace="tls")
    async with cache:
        assert await cache.client.ping()
        await exercise(cache)


async def test_tls_certificate_of_another_ca_fails_open_for_reads_and_loudly_for_invalidations(
    tls_redis: TlsRedisServer,
) -> None:
    """A server certificate that does not verify is never trusted: reads go to the origin, invalidations raise."""
    cache = Cache.from_url(tls_redis.tls_url(ca=tls_redis.pki.other_ca), namespace="tls")
    origin = RecordingOrigin({"u1": {"pk": "u1"}})
    async with cache:
        get_user = users(cache, origin)
        for _ in range(5):
            assert await get_user("u1") == {"pk": "u1"}
        assert cache.stats()[get_user.name]["redis_errors"] >= 1
        assert origin.count == 5
        with pytest.raises(InvalidationError, match=r"(?i)certificate"):
            await cache.invalidate_item("Users", {"pk": "u1"})


async def test_mutual_tls_client_certificate(mtls_redis: TlsRedisServer) -> None:
    """With ``tls-auth-clients yes`` a client certificate from the CA is required, and works."""
    cache = Cache.from_url(mtls_redis.tls_url(client_cert=True), namespace="mtls")
    async with cache:
        await exercise(cache)
    without = Cache.from_url(mtls_redis.tls_url(), namespace="mtls")
    async with without:
        with pytest.raises(InvalidationError):
            await without.invalidate_item("Users", {"pk": "u1"})


async def test_tls_and_acl_user_together(tls_redis: TlsRedisServer) -> None:
    """``rediss://user:password@...``: an ACL user over TLS."""
    admin = aioredis.Redis.from_url(tls_redis.tls_url())
    try:
        await admin.acl_setuser(
            "tlsapp", enabled=True, passwords=["+tls-secret"], keys=["tlsacl:*"], commands=["+@all"]
        )
    finally:
        await admin.aclose()
    cache = Cache.from_url(tls_redis.tls_url(user="tlsapp:tls-secret"), namespace="tlsacl")
    async with cache:
        assert await cache.client.acl_whoami() == "tlsapp"
        await exercise(cache)


# --- ACL users and namespaces as the tenant boundary --------------------------------------


@pytest.fixture
def acl_redis(restartable_redis: RedisServer) -> RedisServer:
    """A private server with an app user, and one user per tenant limited to its namespace's keys."""
    restartable_redis.command("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "+@all")
    for tenant in ("tenant-a", "tenant-b"):
        restartable_redis.command(
            "ACL", "SETUSER", tenant, "on", f">{tenant}-pw", f"~{tenant}:*", "+@all", "-@dangerous"
        )
    restartable_redis.command("ACL", "SETUSER", "default", "off")
    return restartable_redis


async def test_acl_user_with_password(acl_redis: RedisServer) -> None:
    """``redis://app:s3cret@host`` authenticates as that ACL user; the default user is off."""
    cache = Cache.from_url(
        f"redis://app:s3cret@{acl_redis.host}:{acl_redis.port}/0", namespace="acl"
    )
    async with cache:
        assert await cache.client.acl_whoami() == "app"
        await exercise(cache)


async def test_wrong_password_fails_open_for_reads(acl_redis: RedisServer) -> None:
    """A rejected password never fails a read (origin answers, breaker opens); invalidation raises."""
    cache = Cache.from_url(
        f"redis://app:wrong@{acl_redis.host}:{acl_redis.port}/0", namespace="acl"
    )
    origin = RecordingOrigin({"u1": {"pk": "u1"}})
    async with cache:
        get_user = users(cache, origin)
        for _ in range(10):
            assert await get_user("u1") == {"pk": "u1"}
        assert cache.breaker.opened >= 1
        with pytest.raises(InvalidationError):
            await cache.invalidate_item("Users", {"pk": "u1"})


async def test_namespace_is_the_tenant_boundary_under_acl(acl_redis: RedisServer) -> None:
    """A tenant whose ACL user may touch only ``<namespace>:*`` runs every feature; another tenant's keys are refused."""
    host, port = acl_redis.host, acl_redis.port
    a = Cache.from_url(f"redis://tenant-a:tenant-a-pw@{host}:{port}/0", namespace="tenant-a")
    b = Cache.from_url(f"redis://tenant-b:tenant-b-pw@{host}:{port}/0", namespace="tenant-b")
    async with a, b:
        await exercise(a)
        await exercise(b)
        origin = RecordingOrigin({"u9": {"pk": "u9", "secret": "a's"}})
        get_a = users(a, origin)
        await get_a("u9")
        entry_of_a = a._keys.entry("Users|pk=S:u9")
        assert entry_of_a.startswith("tenant-a:")
        with pytest.raises(NoPermissionError):
            await b.client.hgetall(entry_of_a)
        with pytest.raises(NoPermissionError):
            await b.client.delete(entry_of_a)
        # Tenant b invalidating "the same item" touches only its own namespace.
        await b.invalidate_item("Users", {"pk": "u9"})
        assert await get_a.peek("u9") is not None


# --- HMAC-signed entries --------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def signed(redis_client: aioredis.Redis, clock: FakeClock) -> AsyncIterator[Cache]:
    c = Cache(
        redis_client,
        namespace="t",
        soft_ttl=10,
        hard_ttl=100,
        clock=clock,
        early_refresh=0,
        signing_key=KEY,
    )
    async with CacheHost(c) as entered:
        yield entered


@pytest.fixture
def origin() -> RecordingOrigin:
    return RecordingOrigin(
        {
            "u1": {"pk": "u1", "name": "Ada", "age": Decimal("36"), "tags": {"a", "b"}},
            "u2": {"pk": "u2", "name": "Bob"},
        }
    )


async def test_signed_entries_carry_a_signature_and_hit(
    signed: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A fill stores an HMAC over the entry; reads verify it and hit."""
    get_user = users(signed, origin)
    await get_user("u1")
    entry = signed._keys.entry("Users|pk=S:u1")
    assert await redis_client.type(entry) == b"string"  # a whole entry: header, blob, signature
    raw = await entry_field(redis_client, entry, M_ENTRY)
    assert raw is not None and raw.startswith(b"3|")
    body = Signer(KEY).check_string(entry, raw)
    assert body is not None and len(raw) == len(body) + 32
    assert await get_user("u1") == origin.items["u1"]
    assert await get_user("u1", attributes=["name", "nope"]) == {"name": "Ada"}
    assert await get_user.peek("u1") == (origin.items["u1"], "fresh")
    stats = signed.stats()[get_user.name]
    assert origin.count == 1 and stats["hits"] == 2 and stats["bad_signatures"] == 0


async def forge(redis_client: aioredis.Redis, source: str, attrs: dict[str, Any]) -> None:
    """Write ``attrs`` as a whole entry, with the header (deadlines, format) of a real one from ``source``."""
    from swr_cache._codec import encode

    real = await entry_field(redis_client, source, M_ENTRY)
    assert real is not None
    header = real.split(b"|", 7)[:7]
    await redis_client.set(source, b"|".join([*header, encode(attrs)]))  # no signature


async def test_unsigned_entry_is_a_counted_miss(
    signed: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """An entry without a signature (well formed otherwise) is never served: a counted miss, then overwritten."""
    from swr_cache._codec import encode

    get_user = users(signed, origin)
    await get_user("u1")
    entry = signed._keys.entry("Users|pk=S:u1")
    await forge(redis_client, entry, {"pk": "u1", "name": "Mallory"})
    assert (await get_user("u1"))["name"] == "Ada"
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    stats = signed.stats()[get_user.name]
    assert stats["bad_signatures"] == 1 and origin.count == 2
    stored = await entry_field(redis_client, entry, M_ENTRY)
    assert stored is not None
    body = Signer(KEY).check_string(entry, stored)  # overwritten, signed again
    assert body is not None and expand(body)[b"name"] == encode("Ada")


async def test_entry_signed_with_another_key_is_a_counted_miss(
    signed: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis, clock: FakeClock
) -> None:
    """Another process sharing the Redis and namespace but not the key cannot feed us its entries."""
    intruder = Cache(redis_client, namespace="t", clock=clock, signing_key=OTHER_KEY)
    evil = RecordingOrigin({"u1": {"pk": "u1", "name": "Mallory"}})
    async with intruder:
        await users(intruder, evil)("u1")
    get_user = users(signed, origin)
    assert (await get_user("u1"))["name"] == "Ada"
    assert signed.stats()[get_user.name]["bad_signatures"] == 1


async def test_tampered_field_and_moved_entry_are_refused(
    signed: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """Changing one byte of a signed field, or copying a signed entry to another item's key, is detected."""
    from swr_cache._codec import encode

    get_user = users(signed, origin)
    await get_user("u1")
    await get_user("u2")
    e1, e2 = signed._keys.entry("Users|pk=S:u1"), signed._keys.entry("Users|pk=S:u2")
    real = await entry_field(redis_client, e1, M_ENTRY)
    assert real is not None
    await redis_client.set(e1, real.replace(encode("Ada"), encode("Adb")))  # one byte changed
    assert (await get_user("u1"))["name"] == "Ada"
    await redis_client.copy(e1, e2, replace=True)  # u1's valid, signed entry under u2's key
    assert (await get_user("u2"))["name"] == "Bob"
    real = await entry_field(redis_client, e1, M_ENTRY)
    assert real is not None
    spliced = encode({"pk": "u1", "name": "Ada", "extra": "spliced in"})
    head, mac = real.split(b"|", 7)[:7], real[-32:]
    await redis_client.set(e1, b"|".join([*head, spliced]) + mac)  # another blob, the old signature
    assert "extra" not in await get_user("u1")
    assert signed.stats()[get_user.name]["bad_signatures"] == 3
    assert origin.count == 5
    # A partial entry (a hash) with a field changed or added is refused too.
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    await redis_client.delete(e1)
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert await redis_client.type(e1) == b"hash"
    assert len((await redis_client.hgetall(e1))[M_SIG]) == 32
    await redis_client.hset(e1, "name", encode("Adb"))
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    await redis_client.hset(e1, "extra", encode("spliced in"))
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert signed.stats()[get_user.name]["bad_signatures"] == 5


async def test_signed_result_entries(signed: Cache, redis_client: aioredis.Redis) -> None:
    """``@cached`` results are signed too; a forged result is a counted miss."""
    from swr_cache._codec import encode

    calls = 0

    @cached(signed, key="r:{x}", tags=["t"])
    async def result(x: str) -> str:
        nonlocal calls
        calls += 1
        return f"real {x}"

    assert await result("a") == "real a"
    assert await result("a") == "real a"
    entry = (await redis_client.smembers(signed._keys.tag_members("t"))).pop().decode()
    await redis_client.hset(entry, b"\xffr", encode("forged"))
    assert await result("a") == "real a"
    assert calls == 2 and signed.stats()[result.name]["bad_signatures"] == 1
    assert await result.peek("a") == ("real a", "fresh")


async def test_signed_projection_loads_union_instead_of_merging(
    signed: Cache, origin: RecordingOrigin, redis_client: aioredis.Redis
) -> None:
    """A missing attribute of a signed entry is loaded with the cached ones and replaces it, still signed."""
    get_user = users(signed, origin)
    assert await get_user("u1", attributes=["name"]) == {"name": "Ada"}
    assert await get_user("u1", attributes=["name", "age"]) == {"name": "Ada", "age": Decimal(36)}
    assert origin.calls[-1] == ("u1", ["age", "name"])
    assert await get_user("u1", attributes=["age"]) == {"age": Decimal(36)}
    assert origin.count == 2 and signed.stats()[get_user.name]["bad_signatures"] == 0


async def test_signed_stream_refresh_entries_are_served(
    signed: Cache, origin: RecordingOrigin
) -> None:
    """Entries written by the stream hook's refresh mode are signed and served without the origin."""
    get_user = users(signed, origin)
    record = {
        "eventID": "1",
        "eventName": "MODIFY",
        "eventSource": "aws:dynamodb",
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/Users/stream/2024-01-01T00:00:00.000",
        "dynamodb": {
            "Keys": {"pk": {"S": "u1"}},
            "NewImage": {"pk": {"S": "u1"}, "name": {"S": "From the stream"}},
            "SequenceNumber": "100",
        },
    }
    report = await StreamInvalidator(signed, mode="refresh").handle({"Records": [record]})
    assert report.applied == 1
    assert (await get_user("u1"))["name"] == "From the stream"
    assert origin.count == 0 and signed.stats()[get_user.name]["bad_signatures"] == 0


async def test_key_rotation(redis_client: aioredis.Redis, origin: RecordingOrigin) -> None:
    """With ``[new, old]`` entries signed by the old key still verify; without the old key they do not."""
    old = Cache(redis_client, namespace="rot", signing_key=KEY)
    both = Cache(redis_client, namespace="rot", signing_key=[OTHER_KEY, KEY])
    new_only = Cache(redis_client, namespace="rot", signing_key=[OTHER_KEY])
    async with old, both, new_only:
        await users(old, origin)("u1")
        get_both = users(both, origin)
        assert (await get_both("u1"))["name"] == "Ada"
        assert origin.count == 1 and both.stats()[get_both.name]["hits"] == 1
        get_new = users(new_only, origin)
        assert (await get_new("u1"))["name"] == "Ada"
        assert new_only.stats()[get_new.name]["bad_signatures"] == 1
        # What the new key wrote now verifies under [new, old] too.
        assert (await get_both("u1"))["name"] == "Ada"
        assert both.stats()[get_both.name]["hits"] == 2


def test_signing_keys_are_validated(redis_client: aioredis.Redis) -> None:
    """Short or missing keys are refused; the repr never shows a key."""
    with pytest.raises(ConfigError):
        Cache(redis_client, signing_key=b"short")
    with pytest.raises(ConfigError):
        Cache(redis_client, signing_key=[])
    assert "k" * 16 not in repr(Signer(KEY))


def test_signature_message_is_unambiguous() -> None:
    """Moving bytes between a field's name and value, or between key and fields, changes the signature."""
    s = Signer(KEY)
    assert s.sign("e", {b"ab": b"c"}) != s.sign("e", {b"a": b"bc"})
    assert s.sign("e", {b"a": b"b", b"c": b"d"}) != s.sign("e", {b"a": b"bcd"})
    assert s.sign("ea", {b"b": b"c"}) != s.sign("e", {b"ab": b"c"})
    assert s.sign("e", {b"a": b"1", b"b": b"2"}) == s.sign("e", {b"b": b"2", b"a": b"1"})


# The engine suite, again, on a signing cache: signing must not change any behaviour
# it checks, except the merge of missing attributes and which counter a corrupt field bumps.
_NOT_UNDER_SIGNING = {
    # Signed entries never merge (they load the union, tested above), so the merge
    # of missing attributes and its version guard do not apply.
    "test_partial_fill_with_a_version_attribute_loads_only_missing_attributes",
    "test_version_attribute_refuses_to_merge_into_another_version",
    "test_corrupt_field_is_a_counted_miss",  # bad_signatures instead of decode_errors
}


@pytest.fixture
async def cache(redis_client: aioredis.Redis, clock: FakeClock) -> AsyncIterator[Cache]:
    c = Cache(
        redis_client,
        namespace="t",
        soft_ttl=10,
        hard_ttl=100,
        clock=clock,
        early_refresh=0,
        signing_key=KEY,
    )
    async with CacheHost(c) as entered:
        yield entered


_here = sys.modules[__name__]
for _name, _fn in vars(test_engine).copy().items():
    if (
        _name.startswith("test_")
        and inspect.iscoroutinefunction(_fn)
        and "cache" in inspect.signature(_fn).parameters
        and _name not in _NOT_UNDER_SIGNING
    ):
        setattr(_here, f"{_name}__signed", _fn)
del _here, _name, _fn


def test_signed_copies_were_collected() -> None:
    """The engine tests above really run under signing (a guard against an empty import)."""
    names = [n for n in globals() if n.endswith("__signed")]
    assert len(names) >= 20
    assert all(inspect.iscoroutinefunction(globals()[n]) for n in names)
