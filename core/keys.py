"""API keys: created by `nad keys create`, presented by clients, stored only as a hash.

A key reads `nad_<id>_<secret>`. The id is public (it names the key in listings and owns its jobs); the secret
is 256 random bits of which only the sha256 is stored. A plain hash is enough for a secret that cannot be
guessed, and it is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import datetime

from sqlalchemy import String, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from core.database import Base
from core.jobs import UTCDateTime, now

PREFIX = "nad"
# Keys remembered at most, per process: past it the cache starts over, so a flood of made-up keys cannot
# grow it (only good keys enter it, but keys are cheap to create for an operator's scripts).
CACHE_SIZE = 10_000


class KeyCache:
    """Keys checked against the database in the last `seconds`, by the sha256 of the presented text (the
    secret itself is not kept), with the key id they belong to.

    The API trusts a key found here without asking the database again: a client polling its job every
    second would otherwise cost a key lookup per poll, a third of a status read's work. The price: a revoked
    key keeps working in each API process for at most `seconds` (NAD_KEY_CACHE_SECONDS; 0 turns it off)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[str, float]] = {}

    def get(self, presented: str) -> str | None:
        entry = self._entries.get(_digest(presented))
        return entry[0] if entry is not None and entry[1] > time.monotonic() else None

    def put(self, presented: str, key_id: str) -> None:
        if self.seconds <= 0:
            return
        if len(self._entries) >= CACHE_SIZE:
            self._entries.clear()
        self._entries[_digest(presented)] = (key_id, time.monotonic() + self.seconds)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str) -> tuple[ApiKey, str]:
    """A new key and its full text, which is shown once and never stored."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = ApiKey(id=key_id, name=name, secret_sha256=_digest(secret))
    session.add(key)
    session.flush()
    return key, f"{PREFIX}_{key_id}_{secret}"


def authenticate(session: Session, presented: str) -> str | None:
    """The id of the live key `presented` is, or None."""
    prefix, _, rest = presented.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not key_id or not secret:
        return None
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return None
    return key.id if hmac.compare_digest(key.secret_sha256, _digest(secret)) else None


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str) -> bool:
    """Stop a key from working; its jobs stay, out of reach. False if there is no such live key."""
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now())
    )
    return result.rowcount == 1
