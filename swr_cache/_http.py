"""HTTP caching rules for the ASGI middleware: parsing, storability, freshness, keys.

Pure functions, no I/O. ``swr_cache.asgi`` calls them; the rules are RFC 9111
(HTTP caching) as a *shared* cache, RFC 5861 (``stale-while-revalidate``,
``stale-if-error``), RFC 9213 (targeted cache-control fields) and RFC 9211
(``Cache-Status``), with the stricter choices the README's "HTTP responses"
section lists noted where they apply.
"""

from __future__ import annotations

import calendar
import hashlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Final
from urllib.parse import quote

from ._keys import escape

__all__ = [
    "DEFAULT_TTL_STATUSES",
    "HOP_BY_HOP",
    "Judgement",
    "RequestDirectives",
    "authority",
    "content_tags",
    "format_http_date",
    "judge_response",
    "none_match",
    "parse_cache_control",
    "parse_http_date",
    "parse_vary",
    "split_list",
    "target",
    "uri_tag",
]

#: Statuses the default soft TTL applies to (a narrower list
#: than RFC 9110 §15.1, so an error page an attacker provoked is never
#: replayed unless the app gave it explicit freshness).
DEFAULT_TTL_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308})

#: Response fields never stored (RFC 9111 §3.1), plus the ones this cache
#: recomputes (Age, Content-Length) or consumes (surrogate keys, handled by
#: the caller).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"proxy-authorization",
        b"trailer",
        b"content-length",
        b"age",
    }
)

# RFC 9111 §1.2.2: delta-seconds beyond 2^31 saturate.
_MAX_DELTA: Final = 2147483648
# A directive given twice with different values is invalid (§4.2.1: "stale").
_INVALID: Final = "\x00invalid"


# ---------------------------------------------------------------------------
# Lists and directives


def split_list(value: bytes) -> list[bytes]:
    """Split a comma-separated field value, keeping commas inside quoted strings.

    Args:
        value: The field value (several lines already joined with ``", "``).

    Returns:
        The non-empty members, stripped of optional whitespace.
    """
    if b'"' not in value:
        return [m for m in (p.strip() for p in value.split(b",")) if m]
    out: list[bytes] = []
    cur = bytearray()
    quoted = escaped = False
    for byte in value:
        ch = bytes((byte,))
        if escaped:
            cur += ch
            escaped = False
        elif quoted and ch == b"\\":
            cur += ch
            escaped = True
        elif ch == b'"':
            cur += ch
            quoted = not quoted
        elif ch == b"," and not quoted:
            member = bytes(cur).strip()
            if member:
                out.append(member)
            cur.clear()
        else:
            cur += ch
    member = bytes(cur).strip()
    if member:
        out.append(member)
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_cache_control(values: Iterable[bytes]) -> dict[str, str | None]:
    """Parse ``Cache-Control`` lines into ``{directive: argument or None}``.

    Directive names are case-insensitive (lower-cased here); arguments may be
    tokens or quoted strings (unquoted here); unknown directives are kept and
    ignored by the callers. A directive repeated with a different argument is
    marked invalid, which the freshness rules read as "already stale".

    Args:
        values: Each ``Cache-Control`` line's value.

    Returns:
        The directives.
    """
    out: dict[str, str | None] = {}
    for value in values:
        for member in split_list(value):
            name, eq, arg = member.decode("latin-1").partition("=")
            name = name.strip().lower()
            if not name:
                continue
            parsed = _unquote(arg.strip()) if eq else None
            if name in out and out[name] != parsed:
                out[name] = _INVALID
            else:
                out[name] = parsed
    return out


def saturated(digits: str | bytes, cap: int = _MAX_DELTA) -> int:
    """The value of a run of ASCII digits, at most ``cap``.

    A header may hold thousands of digits: ``int()`` refuses more than 4300
    (and is slow well before), so a long run is ``cap`` without converting it.
    """
    significant = digits.lstrip("0") if isinstance(digits, str) else digits.lstrip(b"0")
    if len(significant) > len(str(cap)):
        return cap
    return min(int(significant), cap) if significant else 0


def seconds(directives: Mapping[str, str | None], name: str) -> int | None:
    """A delta-seconds argument: ``None`` when absent, ``-1`` when invalid, else saturated."""
    if name not in directives:
        return None
    arg = directives[name]
    if arg is None or not arg.isdigit() or not arg.isascii():
        return -1
    return saturated(arg)


def field_names(arg: str | None) -> frozenset[bytes]:
    """The field names of a qualified ``no-cache="A, B"`` / ``private="A"``."""
    if not arg or arg == _INVALID:
        return frozenset()
    return frozenset(n.strip().lower().encode("latin-1") for n in arg.split(",") if n.strip())


def parse_vary(values: Iterable[bytes]) -> tuple[str, ...] | None:
    """The lower-cased, sorted, unique field names of ``Vary`` (``None`` for ``*``)."""
    names: set[str] = set()
    for value in values:
        for member in split_list(value):
            # `_` and `-` alike: servers and frameworks map both to one name.
            name = member.decode("latin-1").strip().lower().replace("_", "-")
            if name == "*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


# ---------------------------------------------------------------------------
# Dates (RFC 9110 §5.6.7): GMT only, never local time.

_MONTHS: Final = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_IMF = re.compile(r"^[a-z]{3}, (\d{2}) ([a-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) gmt$")
_RFC850 = re.compile(r"^[a-z]{6,9}, (\d{2})-([a-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) gmt$")
_ASCTIME = re.compile(r"^[a-z]{3} ([a-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})$")


def parse_http_date(value: bytes | None) -> float | None:
    """Seconds since the epoch of an HTTP-date, or ``None`` when absent or invalid.

    Accepts IMF-fixdate, the obsolete RFC 850 form (two-digit years read per
    RFC 9110 §5.6.7) and asctime, case-insensitively.
    """
    if not value:
        return None
    text = value.decode("latin-1").strip().lower()
    try:
        if m := _IMF.match(text):
            day, mon, year, hh, mm, ss = m.groups()
        elif m := _RFC850.match(text):
            day, mon, yy, hh, mm, ss = m.groups()
            # A two-digit year more than 50 years in the future is in the past century.
            year = str(2000 + int(yy))
            if int(year) > _this_year() + 50:
                year = str(1900 + int(yy))
        elif m := _ASCTIME.match(text):
            mon, day, hh, mm, ss, year = m.groups()
        else:
            return None
        month = _MONTHS.get(mon)
        if month is None:
            return None
        parts = (int(year), month, int(day.strip()), int(hh), int(mm), int(ss))
        if not (1 <= parts[2] <= 31 and parts[3] < 24 and parts[4] < 60 and parts[5] < 61):
            return None
        return float(calendar.timegm((*parts, 0, 0, 0)))
    except (ValueError, OverflowError):
        return None


def _this_year() -> int:
    return time.gmtime().tm_year


def format_http_date(t: float) -> bytes:
    """An IMF-fixdate for ``t`` seconds since the epoch."""
    return formatdate(t, usegmt=True).encode("ascii")


# ---------------------------------------------------------------------------
# Conditional requests (RFC 9110 §13.1.2, §8.8.3.2)

_ETAG = re.compile(rb'\s*(W/)?("[^"]*")\s*(?:,|$)')


def _opaque_tags(value: bytes) -> list[bytes] | None:
    """The opaque-tags of an ``If-None-Match`` list (``None`` for ``*``)."""
    if value.strip() == b"*":
        return None
    tags = []
    pos = 0
    while pos < len(value):
        m = _ETAG.match(value, pos)
        if m is None:
            break  # an invalid member: what was parsed so far still counts
        tags.append(m.group(2))
        pos = m.end()
    return tags


def none_match(if_none_match: bytes, etag: bytes | None) -> bool:
    """Whether ``If-None-Match`` matches ``etag`` by the weak comparison (``W/"x"`` = ``"x"``)."""
    tags = _opaque_tags(if_none_match)
    if tags is None:
        return True  # `*` matches any current representation
    if etag is None:
        return False
    stored = etag.strip()
    if stored.startswith(b"W/"):
        stored = stored[2:]
    return stored in tags


def not_modified_since(
    if_modified_since: bytes, last_modified: bytes | None, date: bytes | None
) -> bool:
    """``If-Modified-Since`` against the stored ``Last-Modified`` (else ``Date``).

    An invalid date in the request is ignored (RFC 9110 §13.1.3): not a match.
    """
    since = parse_http_date(if_modified_since)
    if since is None:
        return False
    stamp = parse_http_date(last_modified) if last_modified is not None else None
    if stamp is None:
        stamp = parse_http_date(date)
    return stamp is not None and stamp <= since


def content_etag(content_type: bytes | None, content_encoding: bytes | None, body: bytes) -> bytes:
    """A strong, quoted ETag from the exact stored bytes (deterministic across processes).

    SHA-256 of the content type, content coding and body: two variants that
    differ in any of these differ in ETag; the same bytes give the same ETag
    in every process and after restarts (Python's ``hash()`` would not).
    """
    h = hashlib.sha256()
    h.update(content_type or b"")
    h.update(b"\x00")
    h.update(content_encoding or b"")
    h.update(b"\x00")
    h.update(body)
    return b'"' + h.hexdigest()[:32].encode("ascii") + b'"'


# ---------------------------------------------------------------------------
# Request directives (RFC 9111 §5.2.1)


@dataclass(frozen=True, slots=True)
class RequestDirectives:
    """What a request's ``Cache-Control`` (or ``Pragma: no-cache``) asks of the cache."""

    no_store: bool = False
    no_cache: bool = False
    only_if_cached: bool = False
    max_age: int | None = None
    min_fresh: int | None = None

    @classmethod
    def parse(cls, cache_control: bytes | None, pragma: bytes | None) -> RequestDirectives:
        """Parse the request's fields; ``Pragma: no-cache`` counts only without ``Cache-Control``."""
        if cache_control is None:
            if pragma is not None and b"no-cache" in pragma.lower():
                return cls(no_cache=True)
            return _NO_DIRECTIVES
        cc = parse_cache_control([cache_control])
        max_age = seconds(cc, "max-age")
        min_fresh = seconds(cc, "min-fresh")
        return cls(
            no_store="no-store" in cc,
            # max-age=0 (or an invalid one) means "nothing stored will do".
            no_cache="no-cache" in cc or max_age in (0, -1),
            only_if_cached="only-if-cached" in cc,
            max_age=max_age if max_age is not None and max_age > 0 else None,
            min_fresh=max(min_fresh, 0) if min_fresh is not None else None,
        )


_NO_DIRECTIVES: Final = RequestDirectives()


# ---------------------------------------------------------------------------
# What is stored, and for how long


@dataclass(slots=True)
class Judgement:
    """The verdict on one response: whether to store it and its lifetimes.

    ``reason`` says why not (``""`` when storable). ``intrinsic`` is true when
    the reason lies in the response alone (not in the request's credentials),
    so the cache may remember the URL as uncacheable for a while.
    """

    store: bool
    reason: str = ""
    intrinsic: bool = False
    freshness: float = 0.0  # freshness lifetime, seconds (capped)
    initial_age: float = 0.0  # corrected initial age (RFC 9111 §4.2.3)
    stale: float = 0.0  # seconds it may be served stale after the lifetime
    shared: bool = False  # public or s-maxage: may answer a request with Cookie
    auth_shared: bool = False  # also must-revalidate: may answer one with Authorization
    vary: tuple[str, ...] = ()
    strip: frozenset[bytes] = field(default_factory=frozenset)  # no-cache="..." fields

    @property
    def soft(self) -> float:
        """Seconds from the fill until stale (the freshness still left)."""
        return self.freshness - self.initial_age

    def refused(self, reason: str, intrinsic: bool = True) -> Judgement:
        self.store = False
        self.reason = reason
        self.intrinsic = intrinsic
        return self


def _joined(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


_SF_KEY: Final = re.compile(r"^[a-z*][a-z0-9_\-.*]*$")
_SF_ITEM: Final = re.compile(
    r'^(?:-?\d{1,15}(?:\.\d{1,3})?|"(?:[^"\\]|\\.)*"|[A-Za-z*][!#$%&\'*+\-.^_`|~:/0-9A-Za-z]*|\?[01])$'
)


def targeted_cache_control(
    headers: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]
) -> dict[str, str | None] | None:
    """The directives of the first targeted field (RFC 9213) with a valid, non-empty value.

    ``names`` are lower-case field names in priority order (``cdn-cache-control``,
    say). A targeted field is a Structured Fields Dictionary (RFC 8941):
    lower-case keys, values that are integers, strings, tokens or booleans; a
    field that does not parse as one is skipped. ``None``: no field applies,
    and ``Cache-Control``/``Expires`` decide.
    """
    for target in names:
        lines = _joined(headers, target)
        if not lines:
            continue
        directives: dict[str, str | None] = {}
        valid = True
        for member in split_list(b", ".join(lines)):
            name, eq, arg = member.decode("latin-1").partition("=")
            name, arg = name.strip(), arg.strip()
            if not _SF_KEY.match(name) or (eq and not _SF_ITEM.match(arg)):
                valid = False
                break
            if eq and arg == "?0":
                continue  # a false boolean is the directive's absence
            directives[name] = None if not eq or arg == "?1" else _unquote(arg)
        if valid and directives:
            return directives
    return None


def judge_response(
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    request_time: float,
    response_time: float,
    has_cookie: bool,
    has_auth: bool,
    default_ttl: float,
    grace: float,
    grace_explicit: bool,
    max_ttl: float,
    max_stale: float,
    cache_by_default: bool = True,
    targeted: Sequence[bytes] = (),
) -> Judgement:
    """Decide whether a response to a GET may be stored, and its freshness.

    Storability is RFC 9111 §3 for a shared cache, freshness §4.2, serving
    stale §4.2.4 with RFC 5861's extensions: the freshness lifetime comes
    from ``s-maxage``, ``max-age``, ``Expires - Date`` or, for a short list of
    statuses, ``default_ttl``; the stale window from ``stale-while-revalidate``
    and the configured ``grace``, never with ``must-revalidate``,
    ``proxy-revalidate``, or ``s-maxage`` without an explicit ``stale-*``.

    Args:
        status: The response status.
        headers: The response header lines (surrogate keys already removed).
        request_time: When the request went to the app (seconds since the epoch).
        response_time: When the response started arriving.
        has_cookie: The request carried a ``Cookie`` the cache does not ignore.
        has_auth: The request carried ``Authorization``.
        default_ttl: Freshness for responses without explicit freshness.
        grace: The configured stale window.
        grace_explicit: Whether ``grace`` also applies to explicit freshness.
        max_ttl: Cap on the freshness lifetime.
        max_stale: Cap on the stale window.
        cache_by_default: ``False`` stores only responses marked shareable:
            ``public``, ``s-maxage`` or ``max-age`` (in the field that decides).
        targeted: Targeted cache-control field names (RFC 9213), lower-case, in
            priority order; the first present with a valid value replaces
            ``Cache-Control`` and ``Expires``.

    Returns:
        The judgement.
    """
    j = Judgement(store=True)
    cc, use_expires = _response_directives(headers, targeted)
    if not _storable(j, status, cc, headers):
        return j
    s_maxage = seconds(cc, "s-maxage")
    if not _shareable(j, cc, s_maxage, has_cookie, has_auth):
        return j

    date = parse_http_date(next(iter(_joined(headers, b"date")), None))
    lifetime = _explicit_lifetime(cc, headers, s_maxage, use_expires, date, response_time)
    explicit = lifetime is not None
    if not cache_by_default and not (j.shared or "max-age" in cc):
        return j.refused("not marked shareable")
    if lifetime is None:
        if has_cookie or has_auth:
            # The default TTL never applies to a request with credentials.
            return j.refused("credentials without explicit freshness", intrinsic=False)
        if status not in DEFAULT_TTL_STATUSES:
            return j.refused(f"status {status} without explicit freshness")
        lifetime = default_ttl

    age_value = _age_field(headers)
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    corrected = age_value + max(0.0, response_time - request_time)
    j.initial_age = max(apparent, corrected)
    if explicit:
        j.freshness = min(float(lifetime), max_ttl)
    elif age_value >= _MAX_DELTA:
        return j.refused("invalid or huge Age without explicit freshness")
    else:
        # This cache's own lifetime for the response runs from its arrival: a
        # slow origin (or an upstream Age) must not leave it expired on arrival,
        # or the endpoints that most need stale-while-revalidate never get it.
        j.freshness = min(float(lifetime), max_ttl) + j.initial_age

    window = _stale_window(cc, j.soft, explicit, s_maxage, grace if grace_explicit else 0.0, grace)
    j.stale = min(window, max_stale)
    if j.soft <= 0 and j.stale <= 0:
        return j.refused("already expired")
    return j


def _response_directives(
    headers: Sequence[tuple[bytes, bytes]], targeted: Sequence[bytes]
) -> tuple[dict[str, str | None], bool]:
    """The directives that decide (a targeted field's, else ``Cache-Control``'s); ``Expires`` counts."""
    cc = targeted_cache_control(headers, targeted) if targeted else None
    if cc is not None:
        return cc, False  # a targeted field replaces Expires too (RFC 9213)
    return parse_cache_control(_joined(headers, b"cache-control")), True


def _storable(
    j: Judgement,
    status: int,
    cc: Mapping[str, str | None],
    headers: Sequence[tuple[bytes, bytes]],
) -> bool:
    """RFC 9111 §3 for any request: the status, ``no-store``, ``private``, ``Vary``, ``Set-Cookie``.

    Refuses ``j`` (and returns ``False``) or fills in its ``strip`` and ``vary``.
    """
    if status < 200 or status in (206, 304) or status >= 500:
        # 1xx/101 are not final, 206/304 are not understood as entries here
        # (no range merging), and 5xx are never replayed (CPDoS).
        j.refused(f"status {status}")
        return False
    if "no-store" in cc:
        j.refused("no-store")
        return False
    if "private" in cc:
        # Qualified private="F" is treated as unqualified: the safe, common choice.
        j.refused("private")
        return False
    if "no-cache" in cc:
        names = field_names(cc["no-cache"])
        if not names:
            # Storing it would mean revalidating on every use; not storing is
            # the simple conforming choice (RFC 9111 §5.2.2.4 allows either).
            j.refused("no-cache")
            return False
        j.strip = names
    vary = parse_vary(_joined(headers, b"vary"))
    if vary is None:
        j.refused("vary *")
        return False
    j.vary = vary
    if any(k.lower() == b"set-cookie" for k, _ in headers) and b"set-cookie" not in j.strip:
        j.refused("set-cookie")
        return False
    return True


def _shareable(
    j: Judgement,
    cc: Mapping[str, str | None],
    s_maxage: int | None,
    has_cookie: bool,
    has_auth: bool,
) -> bool:
    """Whether a response may answer this request's credentials (§3.5); sets ``j.shared``.

    ``public`` or ``s-maxage`` make it shared (it may answer a request with a
    cookie); with ``Authorization``, ``must-revalidate`` also does.
    """
    j.shared = "public" in cc or s_maxage is not None
    j.auth_shared = j.shared or "must-revalidate" in cc
    if has_auth and not j.auth_shared:
        j.refused("authorization", intrinsic=False)
        return False
    if has_cookie and not j.shared:
        j.refused("cookie", intrinsic=False)
        return False
    return True


def _explicit_lifetime(
    cc: Mapping[str, str | None],
    headers: Sequence[tuple[bytes, bytes]],
    s_maxage: int | None,
    use_expires: bool,
    date: float | None,
    response_time: float,
) -> float | None:
    """The freshness lifetime the response states (§4.2.1), ``None`` if it states none."""
    if s_maxage is not None:
        return max(s_maxage, 0)
    if (max_age := seconds(cc, "max-age")) is not None:
        return max(max_age, 0)
    if use_expires and (expires_lines := _joined(headers, b"expires")):
        expires = parse_http_date(expires_lines[0])
        # An invalid Expires (or "0") means already expired (RFC 9111 §5.3).
        return 0.0 if expires is None else expires - (date if date is not None else response_time)
    return None


def _age_field(headers: Sequence[tuple[bytes, bytes]]) -> float:
    """The response's ``Age`` (RFC 9111 §5.1), ``2**31`` when it cannot be trusted.

    Age is one delta-seconds. A list (``7200, 0``, or two lines), a fraction
    or a parameter says the chain that produced it is confused about the age:
    the response counts as stale, never as fresh.
    """
    age_lines = _joined(headers, b"age")
    if not age_lines:
        return 0
    only = age_lines[0].strip()
    return saturated(only) if len(age_lines) == 1 and only.isdigit() else float(_MAX_DELTA)


def _stale_window(
    cc: Mapping[str, str | None],
    soft: float,
    explicit: bool,
    s_maxage: int | None,
    explicit_grace: float,
    grace: float,
) -> float:
    """Seconds a response may be served stale (§4.2.4, RFC 5861), before the cap."""
    swr = seconds(cc, "stale-while-revalidate")
    sie = seconds(cc, "stale-if-error")
    swr = max(swr or 0, 0)
    explicit_stale = swr > 0 or (sie is not None and sie > 0)
    if "must-revalidate" in cc or "proxy-revalidate" in cc:
        return 0.0
    if not explicit:
        return grace
    if soft <= 0:
        # Arrived with its explicit freshness used up: only its own
        # stale-while-revalidate permits serving it, never our grace.
        return float(swr)
    if s_maxage is not None and not explicit_stale:
        return 0.0  # s-maxage implies proxy-revalidate (RFC 9111 §5.2.2.10)
    return max(float(swr), explicit_grace)


def stored_headers(
    headers: Sequence[tuple[bytes, bytes]], strip: frozenset[bytes]
) -> list[list[bytes]]:
    """The header lines kept in an entry: in order, duplicates kept, hop-by-hop removed.

    Removes the fields of :data:`HOP_BY_HOP`, every field ``Connection``
    names, and the fields named by ``no-cache="..."`` (``strip``).
    """
    drop = set(HOP_BY_HOP) | strip
    for value in _joined(headers, b"connection"):
        drop.update(m.lower() for m in split_list(value))
    return [[k, v] for k, v in headers if k.lower() not in drop]


# ---------------------------------------------------------------------------
# Keys


_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# RFC 3986 pchar plus "/": what a path may hold unescaped.
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"


def authority(scheme: str, host: bytes | None, server: Any) -> str:
    """The request's authority for the cache key: ``Host`` lower-cased, default port removed.

    Without a ``Host`` (HTTP/1.0), the server's own address stands in.
    """
    if host is not None:
        text = host.decode("latin-1").strip().lower()
    elif server:
        text = (
            f"{server[0]}:{server[1]}".lower() if server[1] is not None else str(server[0]).lower()
        )
    else:
        text = ""
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and text.endswith(f":{default}") and not text.endswith("]"):
        text = text[: -len(str(default)) - 1]
    return text


def target(scope: Mapping[str, Any]) -> str:
    """The request target as received: raw path (else the encoded path) plus raw query."""
    raw = scope.get("raw_path")
    if raw:
        path = raw.decode("latin-1")
    else:
        path = quote(scope.get("root_path", "") + scope.get("path", "/"), safe=_PATH_SAFE)
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


def url_for(scheme: str, host: str, request_target: str) -> str:
    """``scheme://host/target``: what a per-URL tag names."""
    return f"{scheme}://{host}{request_target}"


def uri_tag(url: str) -> str:
    """The tag every stored variant of one URL carries (purged by unsafe methods)."""
    tag = "url:" + url
    if len(tag) > 256:
        return "url#" + hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()
    return tag


def render_pairs(pairs: Sequence[tuple[str, bytes | None]]) -> str:
    """``name=value,...`` with both escaped; an absent header is a bare name.

    Escaping removes every ``,`` and ``=`` from the parts, so the rendering is
    injective: an absent header and an empty one differ, and no value can
    impersonate another pair.
    """
    return ",".join(
        escape(name) if value is None else f"{escape(name)}={escape(value.decode('latin-1'))}"
        for name, value in pairs
    )


def hashed(rendered: str, limit: int = 256) -> str:
    """``rendered``, or its SHA-256 when longer than ``limit`` (long URLs, many Vary values)."""
    if len(rendered) <= limit:
        return rendered
    return "h#" + hashlib.sha256(rendered.encode("utf-8", "surrogateescape")).hexdigest()


def content_tags(values: Iterable[bytes]) -> list[str]:
    """Tags from ``Surrogate-Key`` / ``xkey`` lines: space-separated, in order, unique."""
    seen: dict[str, None] = {}
    for value in values:
        for tag in value.decode("latin-1").split():
            seen.setdefault(tag, None)
    return list(seen)
