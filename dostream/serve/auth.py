"""API keys: who may call the server, and for what.

A request carries `Authorization: Bearer KEY`. A key is either the quick-start admin key in
`DOSTREAM_API_KEY` (compared in constant time, never stored) or one made with `dostream serve keys
add --store DIR [--scopes chat,feedback,admin]`, of which the store keeps only a SHA-256 (the key is
printed once). Scopes: `chat` (`/v1/chat/completions`, `/v1/models`), `feedback` (`/v1/feedback`),
`admin` (everything, and what issue 22 adds). No key or a wrong one: 401, OpenAI's body; a key
without the scope: 403. The server refuses to start with no key at all: it never serves unguarded.
"""

from __future__ import annotations

import hmac

from dostream.serve.protocol import ApiError
from dostream.serve.store import ServeStore, hash_key

ENV_KEY = "DOSTREAM_API_KEY"


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
        kid, scopes = found
        if scope not in scopes and "admin" not in scopes:
            raise ApiError(
                403,
                f"This key ({kid}) lacks the scope '{scope}'.",
                type="permission_error",
                code="insufficient_scope",
            )
        return kid
