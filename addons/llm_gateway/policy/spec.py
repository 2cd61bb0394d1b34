"""What rules.yaml can say, as plain frozen data: every section's datatypes, read by policy/rules.py (the YAML
reader) and decided on by the other policy modules; `Rules` is one whole version of the file.

The `credentials` section: no secret is ever held here: upstream keys are named by where to read them (a file or an environment
variable), gateway tokens by their SHA-256.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_gateway.policy.otel import Otel
from llm_gateway.policy.quotas import Quotas
from llm_gateway.policy.clouds import Clouds
from llm_gateway.protocol.tokens import CACHE_TTL
from llm_gateway.util.globs import Glob

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


def _globs(value: Any, field_name: str) -> tuple[Glob, ...]:
    if isinstance(value, (str, Glob)):
        value = (value,)
    out = []
    for item in value:
        if isinstance(item, str):
            item = Glob(item)
        if not isinstance(item, Glob):
            raise TypeError(f"{field_name} must hold globs, got {item!r}")
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class ClientSignature:
    """One known client. It matches a request if ANY of its matchers matches.

    Plain strings are accepted where globs are expected and turned into `Glob`s; header names in
    `header_values` are lower-cased; a single string is taken as a one-item tuple.
    """

    name: str
    user_agent: tuple[Glob, ...] = ()  # User-Agent globs, case-insensitive
    headers: tuple[Glob, ...] = ()  # header NAME globs: any present header matches
    header_values: tuple[tuple[str, Glob], ...] = ()  # (lower-case header name, value glob)
    system_prompt: tuple[str, ...] = ()  # prefixes of the first text of `system` (leading whitespace ignored)
    stream: str = "as-sent"  # "on" | "off" | "as-sent"
    metadata_user_id: tuple[Glob, ...] = ()  # globs on the body's metadata.user_id string (Claude Code's forms)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a client signature needs a non-empty name")
        if self.stream not in STREAM_MODES:
            raise ValueError(f"client {self.name!r}: stream must be one of {', '.join(STREAM_MODES)}")
        set_ = object.__setattr__
        set_(self, "user_agent", _globs(self.user_agent, "user_agent"))
        set_(self, "headers", _globs(self.headers, "headers"))
        set_(self, "metadata_user_id", _globs(self.metadata_user_id, "metadata_user_id"))
        pairs = self.header_values.items() if isinstance(self.header_values, Mapping) else self.header_values
        values = []
        for name, glob in pairs:
            if not isinstance(name, str) or not name:
                raise ValueError(f"client {self.name!r}: header_values needs header names")
            values.append((name.lower(), _globs(glob, "header_values")[0]))
        set_(self, "header_values", tuple(values))
        prompts = (self.system_prompt,) if isinstance(self.system_prompt, str) else tuple(self.system_prompt)
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError(f"client {self.name!r}: system_prompt prefixes must be non-empty strings")
        set_(self, "system_prompt", tuple(p.lstrip() for p in prompts))


STREAM_MODES = ("on", "off", "as-sent")


MODES = ("regular", "reverse")


@dataclass(frozen=True)
class Upstream:
    """Where a routed API flow goes: scheme://host:port, with the request path appended after `prefix`."""

    scheme: str
    host: str
    port: int
    prefix: str = ""

    def __str__(self) -> str:
        return self.url

    @functools.cached_property
    def url(self) -> str:  # worked out once: every routed request records it
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.prefix}"

    @functools.cached_property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class Api:
    """Which flows are LLM API flows: any host glob and any path glob (query string ignored). `provider`: whose
    wire format they speak (protocol/providers.py: anthropic, aws.bedrock, gcp.vertex_ai)."""

    name: str
    hosts: tuple[Glob, ...]
    paths: tuple[Glob, ...]
    provider: str = "anthropic"


@dataclass(frozen=True)
class Route:
    """An API flow matching every given matcher goes to `upstream`."""

    upstream: Upstream
    host: Glob | None = None
    path: Glob | None = None
    mode: str | None = None
    api: str | None = None
    # translation (addons/translate.py): the upstream speaks this provider's format; Anthropic's when "anthropic"
    provider: str = "anthropic"
    region: str | None = None  # the cloud region (Bedrock: SigV4 scope, inference-profile geography; Vertex: location)
    project: str | None = None  # Vertex: the Google Cloud project
    models: tuple[tuple[Glob, str], ...] = ()  # Anthropic model glob -> the cloud's model id, first match wins
    # failover (addons/failover.py): the next upstreams, in order, each with its own upstream and translation fields
    # (their matchers unused), tried when this one fails before the first byte of its answer
    fallbacks: tuple[Route, ...] = ()


@dataclass(frozen=True)
class HostPattern:
    """A host glob with an optional port, as used by the egress policy."""

    host: Glob
    port: int | None = None

    def match(self, host: str, port: int | None) -> bool:
        return self.host.match(host) and (self.port is None or self.port == port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" if self.port is not None else str(self.host)


@dataclass(frozen=True)
class PathBlock:
    """A path on an inspected host that egress traffic may not reach."""

    host: Glob
    path: Glob


@dataclass(frozen=True)
class Egress:
    default: str = "deny"
    allow: tuple[HostPattern, ...] = ()
    inspect: tuple[HostPattern, ...] = ()
    block: tuple[PathBlock, ...] = ()
    record_allowed: str = "each"  # "each" | "summary": allowed CONNECTs and requests one record each, or as counts


@dataclass(frozen=True)
class Usage:
    log: str | None = None  # absolute path, "-" for stdout, None for no file
    cache_sessions: int = 5000  # sessions whose prompt-cache fingerprints are kept (cachewatch), least recent out
    cache_ttl_5m: float = CACHE_TTL["5m"]  # seconds the API keeps a "5m" cache entry; other values only for a test upstream
    cache_ttl_1h: float = CACHE_TTL["1h"]  # seconds the API keeps a "1h" cache entry


@dataclass(frozen=True)
class Errors:
    unwrap: bool = True
    max_message: int = 2000


@dataclass(frozen=True)
class Timeouts:
    """Seconds; see addons/timeouts.py."""

    first_byte: float = 300.0  # from the request sent upstream to the upstream's response headers
    # The same wait for a request sent upstream without streaming: its headers come only once the whole
    # answer is written, and the Anthropic SDKs wait 600 s for it (their DEFAULT_TIMEOUT) before giving up.
    non_streaming: float = 600.0
    stream_idle: float = 120.0  # longest silence between two chunks of an answer's body


@dataclass(frozen=True)
class Limits:
    request_body: int = 32 * 1024 * 1024  # bytes; Anthropic's API refuses larger requests with 413 too


# The usage fields an answer says how it was billed by, which `pricing[].multipliers` may key on (Anthropic's
# API reference, "usage": `speed` "standard" | "fast" (fast mode), `inference_geo` "global" | "us" (data residency)).
BILLED_USAGE_FIELDS = ("speed", "inference_geo")


@dataclass(frozen=True)
class PriceTier:
    """A long-context tier: a request of more than `above` prompt tokens (input, cache reads and writes) is
    priced whole at these rates, US dollars per million tokens (Anthropic's pricing, "Long context")."""

    above: int
    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens for models matching `model`. `rated` False: the line gives no rates (the
    price list's stand) and only corrects them with `multipliers`. `multipliers`: (usage field, value, factor),
    e.g. ("speed", "fast", 6.0): an answer whose usage says it was billed so costs that many times more."""

    model: Glob
    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    tiers: tuple[PriceTier, ...] = ()
    multipliers: tuple[tuple[str, str, float], ...] = ()
    rated: bool = True


@dataclass(frozen=True)
class Rules:
    source: str = "<defaults>"
    apis: tuple[Api, ...] = ()
    routes: tuple[Route, ...] = ()
    clients: tuple[ClientSignature, ...] = ()
    egress: Egress = field(default_factory=Egress)
    usage: Usage = field(default_factory=Usage)
    errors: Errors = field(default_factory=Errors)
    pricing: tuple[Price, ...] = ()
    credentials: Credentials | None = None  # key custody (addons/credentials.py); None: clients' credentials pass
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    otel: Otel = field(default_factory=Otel)  # OpenTelemetry export switches (policy/otel.py)
    quotas: Quotas = field(default_factory=Quotas)  # spend and rate limits (policy/quotas.py, addons/quotas/)
    clouds: Clouds = field(default_factory=Clouds)  # the cloud credentials the gateway holds (policy/clouds.py)
    # a reload may turn key custody off or drop its tokens (addons/rulefile.py refuses that otherwise)
    allow_custody_off: bool = False


def token_hash(token: str) -> str:
    """Lower-case hex SHA-256 of the token's UTF-8 bytes: what `credentials.tokens[].sha256` holds."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
