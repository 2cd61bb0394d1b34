"""Reading `rules.yaml` into plain, typed, immutable data.

The file is parsed once per load. Every refusal names the file, the line and the reason, because a
gateway that silently ignores a misspelt key lets traffic through that the author meant to stop.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml
from mitmproxy.utils import human

from llm_gateway.policy import otel
from llm_gateway.policy import quotas
from llm_gateway.policy import clouds
from llm_gateway.policy import failover
from llm_gateway.policy.clients import ClientSignature
from llm_gateway.policy.spec import (
    MODES,
    STREAM_MODES,
    UPSTREAM_HEADERS,
    Api,
    Credentials,
    Egress,
    Errors,
    GatewayToken,
    HostPattern,
    Limits,
    PassThrough,
    PathBlock,
    BILLED_USAGE_FIELDS,
    Price,
    PriceTier,
    Route,
    Rules,
    Timeouts,
    Upstream,
    UpstreamKey,
    Usage,
)
from llm_gateway.protocol.providers import ANTHROPIC, PROVIDER_NAMES
from llm_gateway.util.globs import Glob

MAX_NESTING = 100  # deeper YAML is refused (PyYAML's composer recurses once per level)
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")  # what YAML counts as line breaks


class RulesError(ValueError):
    """A rule file that cannot be used; the message is `file:line: reason`."""


def load(path: str | os.PathLike[str]) -> Rules:
    """Read and check a rule file; raise RulesError naming file and line on anything wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: cannot read rule file: {e}") from None
    return parse(text, str(path))


def parse(text: str, source: str = "<string>") -> Rules:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise RulesError(f"{source}:{line}: YAML syntax error: {e.problem or e}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. NUL
        line = len(_LINE_BREAKS.findall(text, 0, e.position)) + 1
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise RulesError(f"{source}:{line}: YAML error: {e.reason} (character {char})") from None
    except yaml.YAMLError as e:
        raise RulesError(f"{source}:1: YAML error: {e}") from None
    except RecursionError:  # the composer recurses once per level of nesting
        raise RulesError(f"{source}:{_too_deep(text)}: nested too deeply") from None
    return _Reader(source).rules(root)


def _too_deep(text: str) -> int:
    """The line where the nesting first goes deeper than MAX_NESTING (the event parser does not recurse)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_NESTING:
                    return event.start_mark.line + 1
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except (yaml.YAMLError, RecursionError):
        pass
    return 1


class _Reader:
    """Walks the YAML node tree, so every value still knows its line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.folder = Path(source).resolve().parent if not source.startswith("<") else Path.cwd()
        self.constructor = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node | None, reason: str) -> RulesError:
        line = node.start_mark.line + 1 if node is not None else 1
        return RulesError(f"{self.source}:{line}: {reason}")

    # --- node helpers -------------------------------------------------------------------------

    def mapping(self, node: yaml.Node, where: str, keys: dict[str, bool]) -> dict[str, yaml.Node]:
        """A mapping with only `keys` (True = required)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{where} must be a mapping")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            key = self.scalar(k)
            if not isinstance(key, str) or key not in keys:
                allowed = ", ".join(keys)
                raise self.fail(k, f"unknown key {key!r} in {where} (allowed: {allowed})")
            if key in out:
                raise self.fail(k, f"duplicate key {key!r} in {where}")
            out[key] = v
        for key, required in keys.items():
            if required and key not in out:
                raise self.fail(node, f"{where} needs {key!r}")
        return out

    def seq(self, node: yaml.Node, where: str) -> list[yaml.Node]:
        if isinstance(node, yaml.ScalarNode) and self.scalar(node) is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{where} must be a list")
        return list(node.value)

    def scalar(self, node: yaml.Node) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, "expected a single value, not a list or mapping")
        try:
            return self.constructor.construct_object(node, deep=True)
        except Exception as e:  # noqa: BLE001 - PyYAML's constructors on `!!int abc`, `!!bool maybe`, a 13th month
            reason = getattr(e, "problem", None) or str(e)
            raise self.fail(node, f"cannot read the value {node.value[:40]!r}: {reason}") from None

    def string(self, node: yaml.Node, where: str) -> str:
        value = self.scalar(node)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, f"{where} must be a non-empty string")
        return value

    def boolean(self, node: yaml.Node, where: str) -> bool:
        value = self.scalar(node)
        if not isinstance(value, bool):
            raise self.fail(node, f"{where} must be true or false")
        return value

    def number(self, node: yaml.Node, where: str) -> float:
        value = self.scalar(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise self.fail(node, f"{where} must be a non-negative number")
        return float(value)

    def choice(self, node: yaml.Node, where: str, choices: tuple[str, ...]) -> str:
        value = self.scalar(node)
        if value not in choices:
            raise self.fail(node, f"{where} must be one of {', '.join(choices)} (got {value!r})")
        return value

    def glob(self, node: yaml.Node, where: str) -> Glob:
        value = self.string(node, where)
        try:
            return Glob(value)
        except ValueError as e:
            raise self.fail(node, f"bad glob in {where}: {e}") from None

    def globs(self, node: yaml.Node, where: str) -> tuple[Glob, ...]:
        """One glob or a list of them."""
        items = [node] if isinstance(node, yaml.ScalarNode) else self.seq(node, where)
        return tuple(self.glob(item, where) for item in items)

    def list_of(self, node: yaml.Node, where: str, read: Callable[[yaml.Node, str], Any]) -> tuple[Any, ...]:
        return tuple(read(item, f"{where}[{i}]") for i, item in enumerate(self.seq(node, where)))

    # --- sections -----------------------------------------------------------------------------

    def rules(self, root: yaml.Node | None) -> Rules:
        if root is None or (isinstance(root, yaml.ScalarNode) and self.scalar(root) is None):  # an emptied file (or one of comments only) would silently switch every rule off
            raise self.fail(None, "the rule file is empty (no apis, clients or egress rules): refusing it")
        top = self.mapping(
            root,
            "the rule file",
            {k: False for k in ("apis", "routes", "clients", "egress", "usage", "errors", "pricing", "credentials")}
            | {"timeouts": False, "limits": False, "otel": False, "quotas": False, "clouds": False,
               "allow_custody_off": False},
        )
        section = lambda key, read, default: read(top[key]) if key in top else default  # noqa: E731
        clients = section("clients", lambda n: self.list_of(n, "clients", self.client), ())
        return Rules(
            source=self.source,
            apis=section("apis", lambda n: self.list_of(n, "apis", self.api), ()),
            routes=section("routes", lambda n: self.list_of(n, "routes", self.route), ()),
            clients=clients,
            egress=section("egress", self.egress, Egress()),
            usage=section("usage", self.usage, Usage()),
            errors=section("errors", self.errors, Errors()),
            pricing=section("pricing", lambda n: self.list_of(n, "pricing", self.price), ()),
            credentials=section("credentials", lambda n: self.credentials(n, clients), None),
            timeouts=section("timeouts", self.timeouts, Timeouts()),
            limits=section("limits", self.limits, Limits()),
            otel=section("otel", lambda n: otel.read(self, n), otel.Otel()),
            quotas=section("quotas", lambda n: quotas.read(self, n), quotas.Quotas()),
            clouds=section("clouds", lambda n: clouds.read(self, n), clouds.Clouds()),
            allow_custody_off=section("allow_custody_off", lambda n: self.boolean(n, "allow_custody_off"), False),
        )

    def api(self, node: yaml.Node, where: str) -> Api:
        m = self.mapping(node, where, {"name": True, "hosts": True, "paths": True, "provider": False})
        return Api(
            name=self.string(m["name"], f"{where}.name"),
            hosts=self.globs(m["hosts"], f"{where}.hosts"),
            paths=self.globs(m["paths"], f"{where}.paths"),
            provider=PROVIDER_NAMES[self.choice(m["provider"], f"{where}.provider", tuple(PROVIDER_NAMES))]
            if "provider" in m else ANTHROPIC,
        )

    def route(self, node: yaml.Node, where: str) -> Route:
        m = self.mapping(node, where, {"match": False, "upstream": True, "provider": False, "region": False, "project": False, "models": False})
        match = self.mapping(m["match"], f"{where}.match", dict.fromkeys(("host", "path", "mode", "api"), False)) if "match" in m else {}
        if isinstance(m["upstream"], yaml.SequenceNode):  # failover: several upstreams, each with its translation
            first, *rest = failover.read_upstreams(self, m, where)
            target = {**{k: getattr(first, k) for k in ("upstream", *failover.TRANSLATION_KEYS)}, "fallbacks": tuple(rest)}
        else:
            target = {**clouds.read_translation(self, m, where), "upstream": self.upstream(m["upstream"], f"{where}.upstream")}
        return Route(
            **target,
            host=self.glob(match["host"], f"{where}.match.host") if "host" in match else None,
            path=self.glob(match["path"], f"{where}.match.path") if "path" in match else None,
            mode=self.choice(match["mode"], f"{where}.match.mode", MODES) if "mode" in match else None,
            api=self.string(match["api"], f"{where}.match.api") if "api" in match else None,
        )

    def upstream(self, node: yaml.Node, where: str) -> Upstream:
        value = self.string(node, where)
        expected = "must look like http(s)://host[:port][/prefix]"
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as e:
            raise self.fail(node, f"{where} {expected}: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(node, f"{where} {expected} (got {value!r})")
        if parts.query or parts.fragment or parts.username or parts.password or "?" in value or "#" in value:
            raise self.fail(node, f"{where} {expected}: no query, fragment or credentials (got {value!r})")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    def client(self, node: yaml.Node, where: str) -> ClientSignature:
        keys = ("name", "user_agent", "headers", "header_values", "system_prompt", "metadata_user_id", "stream")
        m = self.mapping(node, where, {k: k == "name" for k in keys})
        values: tuple[tuple[str, Glob], ...] = ()
        if "header_values" in m:
            hv = self.mapping_any(m["header_values"], f"{where}.header_values")
            values = tuple((self.string(k, "a header name").lower(), self.glob(v, f"{where}.header_values")) for k, v in hv)
        prompts: tuple[str, ...] = ()
        if "system_prompt" in m:
            sp = m["system_prompt"]
            items = [sp] if isinstance(sp, yaml.ScalarNode) else self.seq(sp, f"{where}.system_prompt")
            prompts = tuple(self.string(i, f"{where}.system_prompt") for i in items)
        optional_globs = {
            key: self.globs(m[key], f"{where}.{key}") for key in ("user_agent", "headers", "metadata_user_id") if key in m
        }
        name = self.string(m["name"], f"{where}.name")
        stream = self.stream(m["stream"], f"{where}.stream") if "stream" in m else "as-sent"
        try:
            return ClientSignature(
                name=name, header_values=values, system_prompt=prompts, stream=stream, **optional_globs
            )
        except (TypeError, ValueError) as e:
            raise self.fail(node, f"{where}: {e}") from None

    def stream(self, node: yaml.Node, where: str) -> str:
        """`on` and `off` unquoted are YAML 1.1 booleans (so are yes/no, true/false): take them as meant."""
        value = self.scalar(node)
        if isinstance(value, bool):
            return "on" if value else "off"
        return self.choice(node, where, STREAM_MODES)

    def mapping_any(self, node: yaml.Node, where: str) -> list[tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{where} must be a mapping")
        return list(node.value)

    def host_pattern(self, node: yaml.Node, where: str) -> HostPattern:
        value = self.string(node, where).strip().lower().rstrip(".")
        host, port = value, None
        if value.count(":") == 1:  # host:port (IPv6 literals are written in [brackets])
            host, _, p = value.partition(":")
            port = self.port(node, p, where)
        elif value.startswith("[") and "]:" in value:
            host, _, p = value.rpartition(":")
            port = self.port(node, p, where)
        host = host.strip("[]") or "*"
        try:
            return HostPattern(Glob(host), port)
        except ValueError as e:
            raise self.fail(node, f"bad glob in {where}: {e}") from None

    def port(self, node: yaml.Node, text: str, where: str) -> int:
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise self.fail(node, f"{where}: bad port {text!r}")
        return int(text)

    def egress(self, node: yaml.Node) -> Egress:
        m = self.mapping(node, "egress", dict.fromkeys(("default", "allow", "inspect", "block", "record_allowed"), False))
        return Egress(
            record_allowed=(self.choice(m["record_allowed"], "egress.record_allowed", ("summary", "each"))
                            if "record_allowed" in m else "each"),
            default=self.choice(m["default"], "egress.default", ("deny", "allow")) if "default" in m else "deny",
            allow=self.list_of(m["allow"], "egress.allow", self.host_pattern) if "allow" in m else (),
            inspect=self.list_of(m["inspect"], "egress.inspect", self.host_pattern) if "inspect" in m else (),
            block=self.list_of(m["block"], "egress.block", self.path_block) if "block" in m else (),
        )

    def path_block(self, node: yaml.Node, where: str) -> PathBlock:
        m = self.mapping(node, where, {"host": True, "path": True})
        return PathBlock(self.glob(m["host"], f"{where}.host"), self.glob(m["path"], f"{where}.path"))

    def usage(self, node: yaml.Node) -> Usage:
        cache_keys = ("cache_sessions", "cache_ttl_5m", "cache_ttl_1h")
        m = self.mapping(node, "usage", {"log": False, **dict.fromkeys(cache_keys, False)})
        cache = {k: self.number(m[k], f"usage.{k}") for k in cache_keys if k in m}
        if "cache_sessions" in cache:
            if cache["cache_sessions"] < 1 or cache["cache_sessions"] != int(cache["cache_sessions"]):
                raise self.fail(m["cache_sessions"], "usage.cache_sessions must be a whole number of at least 1")
            cache["cache_sessions"] = int(cache["cache_sessions"])
        if "log" not in m or self.scalar(m["log"]) in (None, False):
            return Usage(log=None, **cache)
        return Usage(log=self.log_path(self.string(m["log"], "usage.log")), **cache)

    def log_path(self, value: str) -> str:
        """Relative paths are relative to the rule file's folder; `-` is stdout."""
        return value if value == "-" else str((self.folder / os.path.expanduser(value)).resolve())

    def errors(self, node: yaml.Node) -> Errors:
        m = self.mapping(node, "errors", {"unwrap": False, "max_message": False})
        max_message = Errors.max_message
        if "max_message" in m:
            max_message = int(self.number(m["max_message"], "errors.max_message"))
            if max_message < 100:
                raise self.fail(m["max_message"], "errors.max_message must be at least 100")
        return Errors(
            unwrap=self.boolean(m["unwrap"], "errors.unwrap") if "unwrap" in m else True,
            max_message=max_message,
        )

    def timeouts(self, node: yaml.Node) -> Timeouts:
        m = self.mapping(node, "timeouts", {"first_byte": False, "non_streaming": False, "stream_idle": False})
        seconds = {}
        for key in m:
            seconds[key] = self.number(m[key], f"timeouts.{key}")
            if seconds[key] <= 0:
                raise self.fail(m[key], f"timeouts.{key} must be more than 0 seconds")
        return Timeouts(**seconds)

    def limits(self, node: yaml.Node) -> Limits:
        m = self.mapping(node, "limits", {"request_body": False})
        if "request_body" not in m:
            return Limits()
        value = self.scalar(m["request_body"])
        try:  # bytes, or a size with a unit as mitmproxy's options take it ("32m")
            size = value if isinstance(value, int) and not isinstance(value, bool) else human.parse_size(str(value))
        except ValueError:
            size = None
        if not size or size <= 0:
            raise self.fail(m["request_body"], "limits.request_body must be a size in bytes, e.g. 33554432 or 32m")
        return Limits(request_body=size)

    def price(self, node: yaml.Node, where: str) -> Price:
        fields = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
        m = self.mapping(node, where, {"model": True, **dict.fromkeys(fields, False), "tiers": False,
                                       "multipliers": False})
        given = [f for f in fields if f in m]
        if given and len(given) < len(fields):
            missing = ", ".join(f for f in fields if f not in m)
            raise self.fail(node, f"{where} gives some rates but not {missing} (give all five, or none to keep the "
                                  "price list's and only set multipliers)")
        if not given and "multipliers" not in m:
            raise self.fail(node, f"{where} needs the five rates ({', '.join(fields)}), or multipliers")
        if not given and "tiers" in m:
            raise self.fail(m["tiers"], f"{where}.tiers needs the line's own five rates too")
        tiers = []
        for i, item in enumerate(self.seq(m["tiers"], f"{where}.tiers") if "tiers" in m else []):
            at = f"{where}.tiers[{i}]"
            t = self.mapping(item, at, {"above": True, **dict.fromkeys(fields, True)})
            above = self.scalar(t["above"])
            if isinstance(above, bool) or not isinstance(above, int) or above <= 0:
                raise self.fail(t["above"], f"{at}.above must be a positive whole number of prompt tokens")
            tiers.append(PriceTier(above, *(self.number(t[f], f"{at}.{f}") for f in fields)))
        multipliers = []
        if "multipliers" in m:
            for field_node, values in self.mapping(m["multipliers"], f"{where}.multipliers",
                                                   dict.fromkeys(BILLED_USAGE_FIELDS, False)).items():
                at = f"{where}.multipliers.{field_node}"
                if not isinstance(values, yaml.MappingNode) or not values.value:
                    raise self.fail(values, f"{at} must map the usage value to a factor, e.g. {{fast: 6}}")
                for key, factor in values.value:
                    value = self.string(key, at)
                    multipliers.append((field_node, value, self.number(factor, f"{at}.{value}")))
        rates = [self.number(m[f], f"{where}.{f}") for f in fields] if given else [0.0] * len(fields)
        return Price(self.glob(m["model"], f"{where}.model"), *rates,
                     tiers=tuple(sorted(tiers, key=lambda t: t.above)), multipliers=tuple(multipliers),
                     rated=bool(given))

    # --- credentials (key custody: addons/credentials.py) ----------------------------------------------

    def credentials(self, node: yaml.Node, client_rules: tuple[ClientSignature, ...]) -> Credentials:
        m = self.mapping(node, "credentials", {"upstream": True, "tokens": False, "pass_through": False})
        upstream = self.list_of(m["upstream"], "credentials.upstream", self.upstream_key)
        if not upstream:
            raise self.fail(m["upstream"], "credentials.upstream needs at least one key (the first is the default)")
        self.unique(m["upstream"], upstream, "credentials.upstream")
        names = {u.name for u in upstream}
        clients = {c.name.lower() for c in client_rules}
        tokens = []
        for i, item in enumerate(self.seq(m["tokens"], "credentials.tokens") if "tokens" in m else []):
            where = f"credentials.tokens[{i}]"
            t = self.mapping(item, where, {"name": True, "sha256": True, "upstream": False, "client": False})
            digest = self.string(t["sha256"], f"{where}.sha256").strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise self.fail(t["sha256"], f"{where}.sha256 must be 64 hex digits (the token's SHA-256; scripts/mint-token)")
            up = self.string(t["upstream"], f"{where}.upstream") if "upstream" in t else upstream[0].name
            if up not in names:
                raise self.fail(t["upstream"], f"{where}.upstream {up!r} is not a credentials.upstream name")
            client = self.string(t["client"], f"{where}.client") if "client" in t else None
            if client is not None and client.lower() not in clients:
                raise self.fail(t["client"], f"{where}.client {client!r} is not a name from the clients section")
            tokens.append(GatewayToken(self.name(t["name"], f"{where}.name"), digest, up, client))
        self.unique(m.get("tokens"), tokens, "credentials.tokens")
        if len({t.sha256 for t in tokens}) < len(tokens):
            raise self.fail(m["tokens"], "credentials.tokens holds the same sha256 twice")
        passes = self.list_of(m["pass_through"], "credentials.pass_through", self.pass_through) if "pass_through" in m else ()
        return Credentials(upstream=upstream, tokens=tuple(tokens), pass_through=passes)

    def name(self, node: yaml.Node, where: str) -> str:
        value = self.string(node, where)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
            raise self.fail(node, f"{where} must be 1-64 letters, digits, '.', '_' or '-' (got {value!r})")
        return value

    def unique(self, node: yaml.Node | None, items: Any, where: str) -> None:
        seen = [item.name for item in items]
        dup = next((n for n in seen if seen.count(n) > 1), None)
        if dup is not None:
            raise self.fail(node, f"{where} names {dup!r} twice")

    def upstream_key(self, node: yaml.Node, where: str) -> UpstreamKey:
        m = self.mapping(node, where, {"name": True, "key_file": False, "key_env": False, "header": False, "key": False})
        if "key" in m:
            raise self.fail(m["key"], f"{where}: the key itself never goes in the rule file; give key_file or key_env")
        if ("key_file" in m) == ("key_env" in m):
            raise self.fail(node, f"{where} needs exactly one of key_file, key_env")
        key_file = os.path.expanduser(self.string(m["key_file"], f"{where}.key_file")) if "key_file" in m else None
        return UpstreamKey(
            name=self.name(m["name"], f"{where}.name"),
            key_file=str(self.folder / key_file) if key_file else None,
            key_env=self.string(m["key_env"], f"{where}.key_env") if "key_env" in m else None,
            header=self.choice(m["header"], f"{where}.header", UPSTREAM_HEADERS) if "header" in m else "x-api-key",
        )

    def pass_through(self, node: yaml.Node, where: str) -> PassThrough:
        m = self.mapping(node, where, dict.fromkeys(("name", "bearer", "api_key", "header_values"), False) | {"name": True})
        if "bearer" not in m and "api_key" not in m:
            raise self.fail(node, f"{where} needs bearer or api_key: which credential it lets through")
        values = tuple(
            (self.string(k, "a header name").lower(), self.glob(v, f"{where}.header_values"))
            for k, v in self.mapping_any(m["header_values"], f"{where}.header_values")
        ) if "header_values" in m else ()
        return PassThrough(
            name=self.name(m["name"], f"{where}.name"),
            bearer=self.globs(m["bearer"], f"{where}.bearer") if "bearer" in m else (),
            api_key=self.globs(m["api_key"], f"{where}.api_key") if "api_key" in m else (),
            header_values=values,
        )
