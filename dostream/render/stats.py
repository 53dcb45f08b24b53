"""`RenderStats`: what rendering did with a collection of streams, and its console report; knows
nothing of tokenizers or templates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class RenderStats:
    """What rendering did with a collection of streams (`render_rows`, `encode_rows`): counts of
    rows kept, truncated and dropped, and the tokens of the kept rows by author, supervised or not."""

    streams: int = 0
    rows: int = 0
    truncated: int = 0
    dropped_no_supervised: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tokens_by_author: dict[str, int] = field(default_factory=dict)
    supervised_by_author: dict[str, int] = field(default_factory=dict)
    truncated_tokens: int = 0  # tokens cut from the truncated rows
    max_length: int | None = None
    unsampled_agent_segments: int = 0  # agent segments (of kept rows) with no sampled token_ids
    plain_chat_streams: int = 0  # chat logs rendered without a chat template
    duplicate_ids: int = 0  # streams whose id an earlier stream had

    @property
    def supervised_frac(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def report(self, view: str | Iterable[str]) -> list[str]:
        """Lines for the console: the supervised tokens by author, then warnings (a whole class of
        demonstrations masked, agent turns with no sampled ids all masked, truncation, chat logs
        rendered plain)."""
        name = view if isinstance(view, str) else ",".join(sorted(view))
        split = ", ".join(
            f"{a} {self.supervised_by_author.get(a, 0):,}/{n:,}"
            for a, n in sorted(self.tokens_by_author.items(), key=lambda kv: -kv[1])
        )
        lines = [
            f"supervised tokens by author under view {name!r}: {split or 'none'}; "
            f"total {self.supervised_tokens:,}/{self.tokens:,} ({self.supervised_frac:.1%}) in {self.rows} row(s)"
        ]
        for a in ("teacher", "oracle"):
            n = self.tokens_by_author.get(a, 0)
            if n and not self.supervised_by_author.get(a):
                lines.append(
                    f"warning: all {n:,} {a} tokens are masked under view {name!r}: demonstrations, usually supervised"
                )
        n = self.tokens_by_author.get("agent", 0)
        if n and not self.supervised_by_author.get("agent") and self.unsampled_agent_segments:
            lines.append(
                f"warning: all {n:,} agent tokens are masked under view {name!r}, and {self.unsampled_agent_segments:,} "
                "agent turn(s) carry no sampled token_ids: if another model or a person wrote them, they are "
                "demonstrations (author teacher: dostream import --assistant other)"
            )
        if self.truncated:
            lines.append(
                f"warning: {self.truncated} of {self.streams} row(s) truncated to {self.max_length} tokens, "
                f"{self.truncated_tokens:,} tokens cut"
            )
        if self.duplicate_ids:
            lines.append(
                f"warning: {self.duplicate_ids} stream(s) repeat an earlier stream's id "
                "(dostream import --dedupe keeps the first of each)"
            )
        if self.plain_chat_streams:
            lines.append(
                f"warning: {self.plain_chat_streams} stream(s) are chat logs rendered plain: their turns run "
                "together with nothing between them; --chat-template renders them with the tokenizer's template"
            )
        return lines
