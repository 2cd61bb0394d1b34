"""Key custody's decisions (the `credentials` section): which credential a request presented, whether it
admits the request and to which upstream key, the key files read (and re-read when a Secret rotates), and new
tokens minted (only their sha256 goes into the rules). addons/credentials.py applies them to flows.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from dataclasses import dataclass
from typing import Mapping

from llm_gateway.policy.spec import Credentials, PassThrough, UpstreamKey, token_hash
from llm_gateway.util.files import file_stamp

logger = logging.getLogger("llm_gateway.credentials")

CREDENTIAL_HEADERS = ("x-api-key", "authorization")  # where clients put Anthropic credentials


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


KEY_CHARS = re.compile(r"[\x21-\x7e]{1,4096}")  # what a header can carry: visible ASCII, no spaces


MAX_KEY_FILE = 64 * 1024  # bytes read from a key file


TOKEN_PREFIX = "llmgw-"


@dataclass(frozen=True)
class Presented:
    """What a request carries: the `x-api-key` value and the `Authorization: Bearer` credential, if any."""

    api_key: str | None = None
    bearer: str | None = None

    def values(self) -> list[str]:
        return [v for v in (self.api_key, self.bearer) if v]


def presented(headers: Mapping[str, str]) -> Presented:
    """Read the client's credentials from request headers (a mitmproxy `Headers` or a lower-case mapping)."""
    api_key = (headers.get("x-api-key") or "").strip() or None
    auth = headers.get("authorization")
    bearer = None
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = value.strip()
    return Presented(api_key, bearer)


@dataclass(frozen=True)
class Decision:
    """`swap` (send the upstream key `upstream`), `pass` (forward the client's own credentials named in
    `passes`, the ones the rule matched) or `refuse` (answer 401). `principal` is the token's or pass-through
    rule's name; `why` says why, with no secret."""

    action: str
    principal: str | None = None
    upstream: UpstreamKey | None = None
    why: str = ""
    passes: tuple[str, ...] = ()  # for `pass`: the credential headers that go upstream


def decide(creds: Credentials, seen: Presented, headers: Mapping[str, str], client: str) -> Decision:
    """What to do with one API request's credentials. Pure; never raises."""
    for value in seen.values():
        token = creds.token_for(value)
        if token is None:
            continue
        if token.client is not None and token.client.lower() != client.lower():
            return Decision("refuse", None, None, f"token {token.name} is for client {token.client}, not {client}")
        return Decision("swap", token.name, creds.upstream_named(token.upstream), f"token {token.name}")
    for rule in creds.pass_through:
        if _passes(rule, seen, headers):
            passes = tuple(name for name, on in (("authorization", rule.bearer), ("x-api-key", rule.api_key)) if on)
            return Decision("pass", rule.name, None, f"pass_through {rule.name}", passes)
    if creds.tokens:
        return Decision("refuse", None, None, "unknown gateway token" if seen.values() else "no gateway token")
    return Decision("swap", None, creds.upstream[0], "no tokens configured")


def _passes(rule: PassThrough, seen: Presented, headers: Mapping[str, str]) -> bool:
    if rule.bearer and not any(g.match(seen.bearer) for g in rule.bearer):
        return False
    if rule.api_key and not any(g.match(seen.api_key) for g in rule.api_key):
        return False
    return all(g.match(headers.get(name)) for name, g in rule.header_values)


def read_key(spec: UpstreamKey) -> str:
    """The key, from its file (surrounding whitespace dropped: Secrets often end with a newline) or its
    environment variable. Raises ValueError with a message that names the source, never the content."""
    if spec.key_file:
        try:
            with open(spec.key_file, "rb") as f:
                raw = f.read(MAX_KEY_FILE + 1)
        except OSError as e:
            raise ValueError(f"upstream key {spec.name}: cannot read {spec.source}: {e.strerror or e}") from None
        if len(raw) > MAX_KEY_FILE:
            raise ValueError(f"upstream key {spec.name}: {spec.source} is larger than {MAX_KEY_FILE} bytes")
        text = raw.decode("ascii", "replace").strip()
    else:
        text = (os.environ.get(spec.key_env or "") or "").strip()
    if not KEY_CHARS.fullmatch(text):
        what = "is empty" if not text else "holds characters a header cannot carry"
        raise ValueError(f"upstream key {spec.name}: {spec.source} {what}")
    return text


class KeyStore:
    """The upstream keys in force, by name. A key that cannot be read (now, or after a change) keeps its
    last good value, with an error logged once per change; one that was never read is missing."""

    def __init__(self) -> None:
        self.specs: tuple[UpstreamKey, ...] = ()
        self.keys: dict[str, str] = {}
        self.stamps: dict[str, tuple | None] = {}
        self.reloads = 0

    def use(self, specs: tuple[UpstreamKey, ...]) -> None:
        """Take the upstream section of new rules: (re)read every key whose spec changed."""
        if specs == self.specs:
            return
        old = {s.name: s for s in self.specs}
        self.specs = specs
        for name in list(self.keys):
            if name not in {s.name for s in specs}:
                del self.keys[name]
        for spec in specs:
            if old.get(spec.name) != spec:
                self.keys.pop(spec.name, None)
                self._load(spec)

    def refresh(self) -> None:
        """Re-read the key files that changed since they were last read."""
        for spec in self.specs:
            if spec.key_file and file_stamp(spec.key_file) != self.stamps.get(spec.name):
                self._load(spec)

    def key(self, name: str) -> str | None:
        return self.keys.get(name)

    def _load(self, spec: UpstreamKey) -> None:
        if spec.key_file:
            self.stamps[spec.name] = file_stamp(spec.key_file)
        try:
            value = read_key(spec)
        except ValueError as e:
            kept = " (keeping the key read before)" if spec.name in self.keys else ""
            logger.error(f"{e}{kept}")
            return
        if self.keys.get(spec.name) != value:
            changed = spec.name in self.keys
            self.keys[spec.name] = value
            if changed:
                self.reloads += 1
            logger.info(f"upstream key {spec.name} {'re-read' if changed else 'read'} from {spec.source}")


def mint(name: str, upstream: str | None = None, client: str | None = None) -> tuple[str, str]:
    """A new token and the rule line that admits it: (token, line). The token is random (256 bits)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"a token name is 1-64 letters, digits, '.', '_' or '-' (got {name!r})")
    if upstream is not None and not NAME.fullmatch(upstream):
        raise ValueError(f"an upstream name is 1-64 letters, digits, '.', '_' or '-' (got {upstream!r})")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    # client names are free text in the rules: quote (a JSON string is a YAML scalar) what is not a plain name
    extra = "".join(f", {k}: {v if NAME.fullmatch(v) else json.dumps(v)}"
                    for k, v in (("upstream", upstream), ("client", client)) if v)
    return token, f'- {{name: {name}, sha256: "{token_hash(token)}"{extra}}}'


