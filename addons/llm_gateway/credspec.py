"""The `credentials` section of the rule file as plain frozen data (read by `rules.py`, used by `credentials.py`).

No secret is ever held here: upstream keys are named by where to read them (a file or an environment
variable), gateway tokens by their SHA-256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .globs import Glob

UPSTREAM_HEADERS = ("x-api-key", "authorization")  # how an upstream takes its key (authorization: Bearer)


@dataclass(frozen=True)
class UpstreamKey:
    """A real upstream key: where to read it (`key_file` or `key_env`) and which header carries it upstream."""

    name: str
    key_file: str | None = None
    key_env: str | None = None
    header: str = "x-api-key"  # "x-api-key" | "authorization" (sent as `Bearer <key>`)

    @property
    def source(self) -> str:
        """Where the key comes from, for messages (never the key)."""
        return f"file {self.key_file}" if self.key_file else f"environment variable {self.key_env}"


@dataclass(frozen=True)
class GatewayToken:
    """A token agents hold, known by its SHA-256 (lower-case hex) only."""

    name: str
    sha256: str
    upstream: str  # the UpstreamKey it is exchanged for
    client: str | None = None  # valid only for requests detected as this client


@dataclass(frozen=True)
class PassThrough:
    """Credentials forwarded unchanged (not gateway tokens), e.g. Claude Code subscription OAuth tokens.
    Every matcher given must match; `bearer` / `api_key` are globs on the credential itself."""

    name: str
    bearer: tuple[Glob, ...] = ()
    api_key: tuple[Glob, ...] = ()
    header_values: tuple[tuple[str, Glob], ...] = ()


@dataclass(frozen=True)
class Credentials:
    upstream: tuple[UpstreamKey, ...]
    tokens: tuple[GatewayToken, ...] = ()
    pass_through: tuple[PassThrough, ...] = ()
    _by_hash: dict[str, GatewayToken] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_hash.update({t.sha256: t for t in self.tokens})

    def token_for(self, presented: str) -> GatewayToken | None:
        return self._by_hash.get(token_hash(presented))

    def upstream_named(self, name: str) -> UpstreamKey | None:
        return next((u for u in self.upstream if u.name == name), None)


def token_hash(token: str) -> str:
    """Lower-case hex SHA-256 of the token's UTF-8 bytes: what `credentials.tokens[].sha256` holds."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


