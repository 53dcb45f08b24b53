"""The server's API keys (the `api_keys` table of `serve.sqlite`) and the tenants they belong to.

`ApiKeys` is part of `serve.store.ServeStore` (its connection, its lock): a key is made with
`dostream serve keys add [--tenant NAME]`, stored as a SHA-256 only (shown once), revoked by id;
a key of no tenant is the default tenant's. The tenants are the default one and those of keys made
with `--tenant` (`serve/tenants.py`: what a tenant owns).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any

from dostream.sqlite import transaction

SCOPES = ("chat", "feedback", "admin")
DEFAULT_TENANT = "default"  # the tenant of a key made without --tenant, and of every row before tenants
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def hash_key(key: str) -> str:
    """Keys are 256 random bits, so a plain SHA-256 is as strong as a slow password hash here."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_tenant_name(name: str) -> str:
    """A tenant's name names a directory (`STORE/tenants/NAME`): letters, digits, `_.-`, 1-64."""
    if not TENANT_NAME.fullmatch(name or ""):
        raise ValueError(
            f"tenant: expected 1-64 letters, digits, '_', '.' or '-' (not starting with one of the last three), got {name!r}"
        )
    return name


class ApiKeys:
    """The `api_keys` table's reads and writes, mixed into `ServeStore`."""

    def add_key(self, name: str, scopes: tuple[str, ...], tenant: str | None = None) -> tuple[str, str]:
        """Make a key (of `tenant`; None: no tenant, today's keys); returns (key id, the key).
        Only its hash is stored: show the key once."""
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}, got {','.join(scopes)!r}")
        if tenant is not None:
            check_tenant_name(tenant)
        key = "ds-" + secrets.token_urlsafe(32)
        kid = "key-" + secrets.token_hex(4)
        with self.lock:
            transaction(
                self.db,
                [
                    (
                        "INSERT INTO api_keys (id, hash, name, scopes, created, revoked, tenant) "
                        "VALUES (?, ?, ?, ?, ?, NULL, ?)",
                        (kid, hash_key(key), name, ",".join(scopes), time.time(), tenant),
                    )
                ],
            )
        return kid, key

    def keys(self) -> list[dict[str, Any]]:
        cols = ("id", "name", "scopes", "created", "revoked", "tenant")
        return [dict(zip(cols, r)) for r in self._all(f"SELECT {', '.join(cols)} FROM api_keys ORDER BY created")]

    def revoke_key(self, kid: str) -> bool:
        """Revoke a key by id; False if there is no such live key."""
        with self.lock:
            row = self.db.execute("SELECT revoked FROM api_keys WHERE id = ?", (kid,)).fetchone()
            if row is None or row[0] is not None:
                return False
            transaction(self.db, [("UPDATE api_keys SET revoked = ? WHERE id = ?", (time.time(), kid))])
        return True

    def lookup_key(self, key: str) -> tuple[str, frozenset[str], str | None] | None:
        """(key id, scopes, tenant or None) of a live key, or None."""
        row = self._one("SELECT id, scopes, tenant FROM api_keys WHERE hash = ? AND revoked IS NULL", (hash_key(key),))
        return None if row is None else (row[0], frozenset(row[1].split(",")), row[2])

    def key_scopes(self, kid: str) -> frozenset[str]:
        row = self._one("SELECT scopes FROM api_keys WHERE id = ?", (kid,))
        return frozenset() if row is None else frozenset(row[0].split(","))

    def key_tenant(self, kid: str) -> str | None:
        """The tenant of key `kid` (None: a key of no tenant, or no such key)."""
        row = self._one("SELECT tenant FROM api_keys WHERE id = ?", (kid,))
        return None if row is None else row[0]

    # -- tenants ----------------------------------------------------------------------------
    def tenants(self) -> list[str]:
        """Every tenant: the default one, then those of keys made with `--tenant`, in order."""
        if not self.tenanted:
            return [DEFAULT_TENANT]
        rows = self._all("SELECT tenant FROM api_keys WHERE tenant IS NOT NULL GROUP BY tenant ORDER BY MIN(created)")
        return [DEFAULT_TENANT, *(r[0] for r in rows if r[0] != DEFAULT_TENANT)]

    def n_live_keys(self) -> int:
        return self._one("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL")[0]
