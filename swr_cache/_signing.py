"""Optional HMAC signing of entries, so a shared Redis cannot feed us forged data.

With ``Cache(..., signing_key=...)`` every entry this package writes (fills,
stream refreshes, write-throughs) is signed with HMAC-SHA256 over the entry's
key and its content: a whole entry (a string, format 3) ends with the 32
bytes of its signature (``signed_string``); a hash entry (a partial item, a
result) carries one more field, ``\\xffg``, signing all of its other fields,
sorted by name. A read verifies it before decoding anything; an entry without
a valid signature is a counted miss (``bad_signatures``), reloaded and
overwritten.

What it protects: anyone who can write to the Redis (another tenant, a
compromised service) but does not hold the key cannot make us serve a value
the origin never returned, move an entry to another key, or splice fields
of two entries together. What it does not: such a writer can still delete
entries (a miss), and can put back an older entry that was validly signed for
the same key, which is served at most until that entry's own signed hard
deadline. Keep Redis private (ACLs, TLS, a namespace per tenant) regardless.

Cost: one HMAC per entry read and per fill. A whole item is one string
(header and msgpack blob, see ``_store``), so its signature covers the
deadlines and every attribute at once; it is read with GET as unsigned ones
are. A hash entry is always read whole (HGETALL, also for a projection),
since a signature over all fields can only be checked with all of them; for
the same reason a missing attribute is loaded together with the cached ones
and replaces the entry rather than being merged into it. Without a key,
nothing here runs.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from ._errors import ConfigError

__all__ = ["MAC_BYTES", "MIN_KEY_BYTES", "M_SIG", "Signer"]

#: The hash field holding an entry's signature (a metadata name: starts with 0xFF).
M_SIG: Final = b"\xffg"
#: Shorter keys are refused: an HMAC is only as strong as its key.
MIN_KEY_BYTES: Final = 16
# Bumped if the signed message's layout ever changes, so old signatures fail.
_DOMAIN: Final = b"swr_cache/entry/1\x00"
# A whole entry's string: another message layout, so another domain.
_STRING_DOMAIN: Final = b"swr_cache/string-entry/1\x00"
#: The length of the signature a signed string entry ends with.
MAC_BYTES: Final = 32


def _as_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"a signing key must be str or bytes of at least {MIN_KEY_BYTES} bytes")
    return key


def _message(entry_key: str, pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The signed bytes: the key and every field, each length-prefixed (so unambiguous)."""
    key = entry_key.encode()
    parts = [_DOMAIN, len(key).to_bytes(4, "big"), key]
    for name, value in sorted(pairs):
        parts += (len(name).to_bytes(4, "big"), name, len(value).to_bytes(4, "big"), value)
    return b"".join(parts)


def _string_message(entry_key: str, value: bytes) -> bytes:
    """The signed bytes of a string entry: the key (length-prefixed), then the string."""
    key = entry_key.encode()
    return b"".join((_STRING_DOMAIN, len(key).to_bytes(4, "big"), key, value))


class Signer:
    """Signs and checks entries with HMAC-SHA256.

    Args:
        keys: one key (``str`` or ``bytes``, at least 16 bytes; 32 random
            bytes recommended), or several for rotation: the first signs, any
            of them verifies. Roll out a new key by listing it second, then
            first, then dropping the old one.

    Raises:
        ConfigError: no key, or a key that is too short.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: bytes | str | Sequence[bytes | str]) -> None:
        if isinstance(keys, (bytes, str)):
            keys = [keys]
        self._keys = tuple(_as_bytes(k) for k in keys)
        if not self._keys:
            raise ConfigError("signing_key must hold at least one key")

    def __repr__(self) -> str:
        return f"Signer(<{len(self._keys)} key(s)>)"  # never the keys themselves

    def sign(self, entry_key: str, fields: Mapping[bytes, bytes]) -> bytes:
        """The signature of an entry about to be written as exactly ``fields``."""
        return hmac.digest(self._keys[0], _message(entry_key, fields.items()), "sha256")

    def signed(self, entry_key: str, fields: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """``fields`` plus their signature field."""
        out = dict(fields)
        out.pop(M_SIG, None)
        out[M_SIG] = self.sign(entry_key, out)
        return out

    def signed_string(self, entry_key: str, value: bytes) -> bytes:
        """A whole entry's string with its signature appended (``MAC_BYTES`` long)."""
        return value + hmac.digest(self._keys[0], _string_message(entry_key, value), "sha256")

    def check_string(self, entry_key: str, raw: bytes) -> bytes | None:
        """A signed string entry without its signature, or ``None`` when the signature is not ours."""
        if len(raw) < MAC_BYTES:
            return None
        value = raw[:-MAC_BYTES]
        if self._valid(raw[-MAC_BYTES:], _string_message(entry_key, value)):
            return value
        return None

    def _valid(self, signature: bytes | None, message: bytes) -> bool:
        if signature is None:
            return False
        for key in self._keys:
            if hmac.compare_digest(hmac.digest(key, message, "sha256"), signature):
                return True
        return False

    def check_hash(self, entry_key: str, raw: dict[bytes, bytes]) -> bool:
        """Verify an HGETALL reply (which the caller owns) and remove its signature field.

        An empty reply (no entry) is valid: there is nothing to trust.
        """
        if not raw:
            return True
        signature = raw.pop(M_SIG, None)
        return self._valid(signature, _message(entry_key, raw.items()))

    def check_fields(
        self, entry_key: str, names: Sequence[bytes], values: Sequence[bytes | None]
    ) -> bool:
        """Verify an HMGET of ``names`` (the signature field last) that covers a whole entry.

        Every name is expected present; an entry that lacks one of them, or
        has fields beyond them, was not written as one signed whole. A reply
        of only ``None`` (no entry) is valid.
        """
        if all(v is None for v in values):
            return True
        pairs = [(n, v) for n, v in zip(names[:-1], values[:-1], strict=True) if v is not None]
        return self._valid(values[-1], _message(entry_key, pairs))
