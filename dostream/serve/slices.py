"""A tenant's slice of the server's store: the reads its preparer, learner, memory and export make.

`ServeStore.slice(tenant)`: every read restricted to the tenant's rows (`exchanges.tenant`,
`feedback.tenant`), its conversation ids its own (`qualify`); writes go to the store (an
`Exchange` names its tenant). What a tenant owns besides: `serve/tenants.py`.
"""

from __future__ import annotations

from typing import Any

from dostream.serve.keys import DEFAULT_TENANT
from dostream.stream import Stream


class Slice:
    """One tenant's part of a `ServeStore`: the reads its preparer, learner and memory make, each
    restricted to the tenant's rows; writes go to the store (an `Exchange` names its tenant)."""

    def __init__(self, store: Any, tenant: str):
        self.store, self.tenant = store, tenant

    def __getattr__(self, name: str):  # what needs no restriction: path_segments, continuation_key, ...
        return getattr(self.store, name)

    def qualify(self, conversation: str | None) -> str | None:
        """The stored id of the tenant's conversation `conversation` (a client's id or `user`): as
        given when it is the tenant's (or the tenant is the default), else `TENANT:ID`, so ids
        never collide across tenants and naming another tenant's id reaches nothing of it."""
        if conversation is None or self.tenant == DEFAULT_TENANT or self.store.tenant_of(conversation) == self.tenant:
            return conversation
        return f"{self.tenant}:{conversation}"

    def owns_exchange(self, seq: int) -> bool:
        own, args = self.store._of(self.tenant)
        return self.store._one(f"SELECT 1 FROM exchanges WHERE seq = ? AND {own}", (seq, *args)) is not None

    def find_continuation(self, keys, conversation=None):
        return self.store.find_continuation(keys, conversation, self.tenant)

    def exchange(self, completion_id: str):
        return self.store.exchange(completion_id, self.tenant)

    def latest_exchange(self, conversation: str):
        return self.store.latest_exchange(self.qualify(conversation), self.tenant)

    def has_conversation(self, conversation: str) -> bool:
        return self.store.has_conversation(conversation, self.tenant)

    def conversations(self) -> list[str]:
        return self.store.conversations(self.tenant)

    def export_streams(self, start: int = 0, stop: int | None = None) -> list[Stream]:
        return self.store.export_streams(start, stop, self.tenant)

    def conversation_streams(self, conversation: str, until=None) -> list[Stream]:
        conversation = self.qualify(conversation)
        if self.store.tenant_of(conversation) != self.tenant:
            return []
        return self.store.conversation_streams(conversation, until)

    def latest_seqs(self) -> tuple[int, int]:
        return self.store.latest_seqs(self.tenant)

    def conversations_since(self, upto, until=None):
        return self.store.conversations_since(upto, self.tenant, until)

    def rewarded(self, upto: int, limit: int):
        return self.store.rewarded(upto, limit, self.tenant)
