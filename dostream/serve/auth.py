"""API keys: who may call the server, and for what.

A request carries `Authorization: Bearer KEY`. A key is either the quick-start admin key in
`DOSTREAM_API_KEY` (compared in constant time, never stored) or one made with `dostream serve keys
add --store DIR [--scopes chat,feedback,admin]`, of which the store keeps only a SHA-256 (the key is
printed once). Scopes: `chat` (`/v1/chat/completions`, `/v1/models`), `feedback` (`/v1/feedback`),
`admin` (everything, and what issue 22 adds). No key or a wrong one: 401, OpenAI's body; a key
without the scope: 403. The server refuses to start with no key at all: it never serves unguarded.

Tenants (`serve/tenants.py`): a key made with `--tenant NAME` acts for that tenant only, its
`admin` scope included (it learns and rolls back its own tenant's adapter); a key of no tenant
acts for the default tenant, and with `admin` (or `DOSTREAM_API_KEY`) for any tenant, named by the
`X-Tenant` header or the route. A key that names a tenant not its own: 403, naming no other tenant.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from dostream.serve.protocol import ApiError
from dostream.serve.store import DEFAULT_TENANT, ServeStore, hash_key

ENV_KEY = "DOSTREAM_API_KEY"


@dataclass(frozen=True)
class Caller:
    """Who calls: the key's id, the tenant it acts for, whether it may act for any tenant."""

    key: str
    tenant: str
    any_tenant: bool = False


class Auth:
    def __init__(self, store: ServeStore, env_key: str | None):
        self.store = store
        self._env_hash = hash_key(env_key) if env_key else None

    def configured(self) -> bool:
        return self._env_hash is not None or self.store.n_live_keys() > 0

    def check(self, authorization: str | None, scope: str) -> str:
        """The id of the key that may do `scope` (`env` for `DOSTREAM_API_KEY`), else ApiError."""
        if not authorization:
            raise ApiError(
                401,
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                code="missing_api_key",
            )
        kind, _, key = authorization.partition(" ")
        key = key.strip()
        if kind.lower() != "bearer" or not key:
            raise ApiError(401, "Authorization must be 'Bearer KEY'.", code="invalid_api_key")
        if self._env_hash is not None and hmac.compare_digest(hash_key(key), self._env_hash):
            return "env"
        found = self.store.lookup_key(key)
        if found is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        kid, scopes, _ = found
        if scope not in scopes and "admin" not in scopes:
            raise ApiError(
                403,
                f"This key ({kid}) lacks the scope '{scope}'.",
                type="permission_error",
                code="insufficient_scope",
            )
        return kid

    def caller(self, authorization: str | None, scope: str, tenant: str | None = None) -> Caller:
        """`check`, then the tenant the call acts for: `tenant` (a route's or `X-Tenant`) when the
        key may act for it, else the key's own; a key of a tenant naming another: 403."""
        kid = self.check(authorization, scope)
        if kid == "env":
            own, anyone = None, True
        else:
            found = self.store.key_tenant(kid)
            own = found
            anyone = found is None and "admin" in self.store.key_scopes(kid)
        if tenant is None or tenant == (own or DEFAULT_TENANT) or anyone:
            return Caller(kid, tenant or own or DEFAULT_TENANT, anyone)
        raise ApiError(
            403, f"This key ({kid}) acts for its own tenant only.", type="permission_error", code="wrong_tenant"
        )
