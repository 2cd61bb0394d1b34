"""Error envelopes: restore Anthropic's native error from what a proxy (LiteLLM, Envoy, nginx) made of it.

Behind LiteLLM a rate limit, an overload and a bad key can all arrive as
`{"error":{"message":"<escaped native JSON>","type":"None","param":"None","code":"429"}}`, sometimes with
the wrong status (an upstream 529 as 500) and without the retry headers. Clients pick retries and backoff
from the status and `error.type`, so the gateway finds the native error inside the envelope and sends it
as the API would have.

Pure logic, applied by pipeline/answer.py (bodies) and pipeline/streamreader.py (stream error frames). Nothing here raises: any input that is not understood gives either a
native error built from the status (for error statuses) or None (leave the response untouched).

Shapes handled (each with the LiteLLM versions that send it, in `unwrap_response`): the native error JSON
escaped in `error.message`; the same
as a Python bytes repr (`b'{…}'`); with a `. Received Model Group=…` or `\\n\\nLiteLLM: model group …`
suffix; with a `litellm.<X>Error: Anthropic(Exception|Error) - ` prefix; an Anthropic-shaped outer error
whose message holds the real one; any of these nested (an envelope quoted as a JSON string inside another);
and in general the first `{` (or `b'`, or JSON string literal) in a string that starts a parseable native
error. Where there is no inner native error the error is built from the status, with the proxy's own
message (or the body text) as the message.
"""

from __future__ import annotations

import ast
import copy
import html
import http
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_gateway.protocol import errors, jsoncodec
from llm_gateway.protocol.headers import normalize

# Bodies larger than this are not parsed (error bodies are small); their head becomes the message.
MAX_PARSE_BYTES = 1 << 20
# A Python literal (bytes repr, dict repr) longer than this is not evaluated.
MAX_LITERAL_CHARS = 64 * 1024
# How deep the search may go (one level of wrapping costs 3 to 6), and how many parse attempts one call
# may make in total.
MAX_DEPTH = 40
MAX_ATTEMPTS = 256

TRUNCATION_MARK = "…[truncated]"

# Where a JSON object, a Python bytes literal or a JSON string literal may start inside a string (an
# escaped quote cannot open a string at this level).
_START = re.compile(r"""\{|(?<![\w'"])b['"]|(?<!\\)\"""")
# A whole Python bytes literal on one line (escapes included); possessive, so it cannot backtrack.
_BYTES_LITERAL = re.compile(r"""b(?:'(?:[^'\\\n]++|\\.)*+'|"(?:[^"\\\n]++|\\.)*+")""", re.S)
# One JSON string escape, for strings escaped once more than JSON needs (`{\"type\":\"error\"…`).
_JSON_ESCAPE = re.compile(
    r'\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})'
)
_LITELLM_PREFIX = re.compile(r"\s*litellm\.\w+(?:Error|Exception)\b")
# Explicit statuses inside a proxy's message (never guessed from prose): the SDKs' `Error code: 429 - …`, a
# provider error object's numeric `code` or its status name (Google RPC names, as Vertex sends them), and
# Anthropic's own overload message after LiteLLM's provider prefix (LiteLLM answers an overload with 500).
_ERROR_CODE = re.compile(r"\bError code: ([45]\d\d)\b")
_CODE_FIELD = re.compile(r"""['"]code['"]\s*:\s*['"]?([45]\d\d)\b""")
_STATUS_NAME = re.compile(r"""['"]status['"]\s*:\s*['"]([A-Z_]+)['"]""")
# google.rpc.Code names -> the HTTP status Google maps each to (cloud.google.com/apis/design/errors).
_RPC_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ABORTED": 409, "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNKNOWN": 500, "DATA_LOSS": 500,
    "NOT_IMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_ANTHROPIC_OVERLOAD = re.compile(r"litellm\.\w+:\s*Anthropic(?:Exception|Error)\s*-\s*Overloaded\b")
_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.I | re.S)
_HTML_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_DECODER = json.JSONDecoder()

# Upstream headers LiteLLM renames to `llm_provider-<name>` and that clients need under their own name.
_RESTORABLE_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry", "request-id")
_RESTORABLE_PREFIXES = ("anthropic-ratelimit-",)
_PROVIDER_PREFIX = "llm_provider-"


@dataclass(frozen=True)
class Unwrapped:
    status: int  # the restored status
    body: bytes  # the native error JSON
    error_type: str
    request_id: str | None  # from the inner native error (for the `request-id` header)
    source: str  # the shape found: "litellm-passthrough", "litellm-bytes-repr", … (see `unwrap_response`)
    original_status: int


# --------------------------------------------------------------------------------------------- public


def explicit_status(message: Any) -> int | None:
    """The status a proxy's error message states explicitly, or None.

    Signals, in order: Anthropic's overload message after LiteLLM's provider prefix
    (`litellm.InternalServerError: AnthropicException - Overloaded.`: 529; LiteLLM sends it as 500), the
    SDKs' `Error code: NNN`, a provider error object's `'code': NNN`, its `'status': 'RESOURCE_EXHAUSTED'`
    (google.rpc.Code names). Prose ("quota", "too many") is never read."""
    if not isinstance(message, str) or not message:
        return None
    head = message[:MAX_LITERAL_CHARS]
    if _ANTHROPIC_OVERLOAD.search(head):
        return 529
    for pattern in (_ERROR_CODE, _CODE_FIELD):
        match = pattern.search(head)
        if match:
            return int(match.group(1))
    match = _STATUS_NAME.search(head)
    if match and match.group(1) in _RPC_STATUS:
        return _RPC_STATUS[match.group(1)]
    return None


def unwrap_response(
    status: int, content_type: str | None, body: bytes, max_message: int = 2000
) -> Unwrapped | None:
    """The native error to send instead of this response, or None to leave it untouched.

    None for statuses below 400 and for bodies that already are native errors (with no wrapped error in
    their message). `source` names the shape found:

    - "litellm-passthrough": `{"error":{"message":"<native JSON>",…}}` (pass-through route, LiteLLM ≤ 1.91)
    - "litellm-bytes-repr": the same with the message a Python bytes repr `b'<native JSON>'` (stream: true)
    - "litellm-routed": the same with a `. Received Model Group=…` suffix (routed /v1/messages ≤ 1.100)
    - "litellm-chat": `{"error":{"message":"litellm.<X>Error: AnthropicException - {…}…",…}}`
    - "litellm-wrapped-anthropic": a native-shaped outer error whose message holds the real native error
      (routed /v1/messages ≥ 1.101)
    - "embedded-json": a native error somewhere else in a JSON body (e.g. FastAPI's `{"detail": "…"}`)
    - "embedded-text": a native error inside a body that is not JSON
    - "proxy-error": a JSON error with no native error inside (LiteLLM's own errors); built from the status,
      or from the status its message states (`explicit_status`: Vertex's 429 inside a 500, an overload)
    - "untyped-error": a native-shaped error whose `error.type` is "None"/empty; built from the status
      (or the status its message states: `explicit_status`)
    - "litellm-overload": a native `api_error` whose message is LiteLLM's report of an Anthropic overload
    - "unknown-json": other JSON; built from the status with the body text as message
    - "non-json": text or HTML with no native error inside; built from the status
    - "empty": an empty body; built from the status
    - "unknown": the parser failed unexpectedly; built from the status with a generic message
    """
    try:
        if not isinstance(status, int) or status < 400:
            return None
        return _unwrap_response(status, content_type, body, max_message)
    except Exception:  # noqa: BLE001 - never raise; fall back to a plain error built from the status
        try:
            return _built(status, f"HTTP {status}", "unknown", max_message)
        except Exception:  # noqa: BLE001
            return None


def unwrap_error_event(data: dict) -> dict | None:
    """For the data of an SSE `event: error` frame: the native error dict it wraps, or None.

    None when `data` already is a native error with no wrapped error in its message, or is not understood.
    A LiteLLM-shaped `{"error":{"message":…,"code":"529"}}` with no native error inside becomes a native
    one typed from its `code` (or its `type`, when that is a native type); a native-shaped one typed "None"
    becomes an `api_error`.
    """
    try:
        if not isinstance(data, dict):
            return None
        budget = _Budget()
        if errors.is_native_error(data):
            inner = _inner_of_native(data, 0, budget)
            if inner is not None:
                return copy.deepcopy(inner)
            if _untyped(data):
                message = _as_text(data["error"].get("message"))
                stated = explicit_status(message)
                error_type = errors.error_type_for_status(stated) if stated else "api_error"
                return errors.error_body(error_type, message, errors.request_id_of(data))
            return _restated(data)
        found = _search(data, 0, budget)
        if found is not None:
            return copy.deepcopy(found)
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            message = _as_text(err.get("message"))
            error_type = _type_from_litellm(err)
            return errors.error_body(error_type, message)
        return None
    except Exception:  # noqa: BLE001
        return None


def status_of_error_body(parsed: Any) -> int | None:
    """The error status a body sent as a success stands for, or None when it is not an error: a native error
    (its type's status) or a relay's `{"error": {"code", "message"}}` (OpenRouter documents answering errors
    that come up after its 200 this way; typed as `_type_from_litellm` types it). A Message is never one."""
    if not isinstance(parsed, dict) or parsed.get("type") == "message":
        return None
    if errors.is_native_error(parsed):
        return errors.status_of(parsed["error"]["type"])
    err = parsed.get("error")
    if isinstance(err, dict) and ("message" in err or "code" in err):
        return errors.status_for_error_type(_type_from_litellm(err))
    return None


def header_fixes(headers: Mapping[str, str], request_id: str | None = None) -> dict[str, str]:
    """Headers to set on a response so clients see what the upstream sent.

    `llm_provider-retry-after` → `retry-after` (likewise `retry-after-ms`, `x-should-retry`, `request-id`,
    `anthropic-ratelimit-*`), only where the plain header is absent. With `request_id` (from an unwrapped
    error), `request-id` is set when absent. Pure: returns the headers to set, changes nothing.
    """
    fixes: dict[str, str] = {}
    try:
        present = normalize(headers)  # one pass over the raw fields: mitmproxy's Headers.items() is quadratic
        for name, value in present.items():
            if not name.startswith(_PROVIDER_PREFIX):
                continue
            plain = name[len(_PROVIDER_PREFIX) :]
            restorable = plain in _RESTORABLE_HEADERS or plain.startswith(_RESTORABLE_PREFIXES)
            if restorable and plain not in present and plain not in fixes and value.strip():
                fixes[plain] = value
        if request_id and isinstance(request_id, str) and "request-id" not in present:
            fixes.setdefault("request-id", request_id)
    except Exception:  # noqa: BLE001
        return fixes
    return fixes


# ------------------------------------------------------------------------------------------- internals


class _Budget:
    """Caps the parse attempts and nodes visited in one call, so pathological bodies stay cheap."""

    __slots__ = ("left", "slow_left")

    def __init__(self, left: int = MAX_ATTEMPTS, slow_left: int = 8) -> None:
        self.left = left
        self.slow_left = slow_left  # scans done in Python (dict reprs), which cost more

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def take_slow(self) -> bool:
        self.slow_left -= 1
        return self.slow_left >= 0 and self.take()


def _unwrap_response(status: int, content_type: str | None, body: bytes, max_message: int) -> Unwrapped | None:
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    elif not isinstance(body, bytes | bytearray | memoryview):
        body = b""
    body = bytes(body)

    if not body.strip():
        reason = reason_phrase(status)
        message = f"HTTP {status} {reason} (empty body)" if reason else f"HTTP {status} (empty body)"
        return _built(status, message, "empty", max_message)

    if len(body) > MAX_PARSE_BYTES:
        # Too big to be an error envelope worth parsing: report its head.
        head = body[: max(0, max_message) * 4 + 16].decode("utf-8", "replace")
        return _built(status, _message_text(head, content_type), "non-json", max_message, force_mark=True)

    text = body.decode("utf-8", "replace")
    budget = _Budget()
    stripped = text.strip()
    parsed: Any = None
    is_json = False
    if stripped[:1] in ("{", "["):
        parsed = jsoncodec.loads(stripped)
        is_json = parsed is not None  # an object or an array: never null

    if is_json:
        if errors.is_native_error(parsed):
            inner = _inner_of_native(parsed, 0, budget)
            if inner is not None:
                return _from_inner(inner, status, "litellm-wrapped-anthropic", parsed)
            if _untyped(parsed):
                message = _as_text(parsed["error"].get("message")) or stripped
                stated = explicit_status(message)
                return _built(stated or status, message, "untyped-error", max_message, errors.request_id_of(parsed), original=status)
            restated = _restated(parsed)
            if restated is not None:
                return _from_inner(restated, status, "litellm-overload", parsed)
            return None
        found = _search(parsed, 0, budget)
        if found is not None:
            return _from_inner(found, status, _classify(parsed), parsed)
        message = _outer_message(parsed)
        if message is not None:
            stated = explicit_status(message)
            return _built(stated or status, message or stripped, "proxy-error", max_message, original=status)
        return _built(status, stripped, "unknown-json", max_message)

    found = _find_native(text, 0, budget)
    if found is not None:
        return _from_inner(found, status, "embedded-text", None)
    return _built(status, _message_text(text, content_type), "non-json", max_message)


def _from_inner(inner: dict, original_status: int, source: str, outer: Any) -> Unwrapped:
    """An `Unwrapped` carrying the native error `inner` exactly as found."""
    err = inner["error"]
    error_type = err["type"]
    request_id = errors.request_id_of(inner) or errors.request_id_of(outer)
    if isinstance(err.get("message"), str):
        body = jsoncodec.dumps(inner)
    else:  # a native shape with a missing or odd message: normalise it
        body = jsoncodec.dumps(errors.error_body(error_type, _as_text(err.get("message")), errors.request_id_of(inner)))
    return Unwrapped(
        status=errors.status_for_error_type(error_type, default=original_status),
        body=body,
        error_type=error_type,
        request_id=request_id,
        source=source,
        original_status=original_status,
    )


def _built(
    status: int,
    message: str,
    source: str,
    max_message: int,
    request_id: str | None = None,
    force_mark: bool = False,
    original: int | None = None,
) -> Unwrapped:
    """A native error built from the status, with `message` bounded to `max_message` characters; `original`
    is the status received when the body stated another one."""
    error_type = errors.error_type_for_status(status)
    message = _bounded(message, max_message, force_mark)
    return Unwrapped(
        status=status,
        body=jsoncodec.dumps(errors.error_body(error_type, message, request_id)),
        error_type=error_type,
        request_id=request_id,
        source=source,
        original_status=original or status,
    )


def _bounded(message: str, max_message: int, force_mark: bool = False) -> str:
    max_message = max(0, int(max_message))
    if len(message) <= max_message and not force_mark:
        return message
    if max_message <= len(TRUNCATION_MARK):
        return message[:max_message]
    return message[: max_message - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def reason_phrase(status: int) -> str:
    """The reason phrase for a status (529: "Overloaded"), "" for one without."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return {529: "Overloaded"}.get(status, "")


def _message_text(text: str, content_type: str | None) -> str:
    """The message for a body that is not JSON: its text, HTML reduced to its readable words."""
    ct = (content_type or "").lower()
    head = text.lstrip()[:64].lower()
    if "html" in ct or head.startswith(("<!doctype html", "<html", "<head", "<body", "<title")):
        title_match = _HTML_TITLE.search(text)
        title = _SPACE.sub(" ", html.unescape(title_match.group(1))).strip() if title_match else ""
        words = _HTML_DROP.sub(" ", text)
        if title_match:
            words = words.replace(title_match.group(0), " ", 1)
        words = _SPACE.sub(" ", html.unescape(_HTML_TAG.sub(" ", words))).strip()
        if title and words.startswith(title):
            words = words[len(title) :].strip()
        readable = f"{title}: {words}" if title and words else (title or words)
        if readable:
            return readable
    return text.strip()


def _restated(native: dict) -> dict | None:
    """A native `api_error` whose message is LiteLLM's report of an Anthropic overload, retyped as the
    `overloaded_error` it was (LiteLLM sends an overload as a 500 api_error); None for any other error."""
    message = native["error"].get("message")
    if native["error"]["type"] != "api_error" or explicit_status(message) != 529:
        return None
    return errors.error_body("overloaded_error", message, errors.request_id_of(native))


def _untyped(native: dict) -> bool:
    """A native-shaped error whose type is LiteLLM's stringified None (or empty)."""
    return native["error"]["type"].strip() in ("", "None", "none", "null")


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return jsoncodec.dumps(value).decode("utf-8", "replace")
    except (TypeError, ValueError, RecursionError):  # not JSON: a value a relay wrote as something else
        return str(value)


def _outer_message(parsed: Any) -> str | None:
    """The proxy's own message in a JSON error body, or None if the body is not error-shaped."""
    if not isinstance(parsed, dict):
        return None
    err = parsed.get("error")
    if isinstance(err, dict):
        if "message" in err:
            return _as_text(err.get("message"))
        if "detail" in err:
            return _as_text(err.get("detail"))
        return _as_text(err)
    if isinstance(err, str):
        return err
    for key in ("detail", "message"):
        if key in parsed:
            return _as_text(parsed[key])
    return None


def _type_from_litellm(err: dict) -> str:
    """The native type for a LiteLLM error dict: from a status its message states (`explicit_status`), else
    its numeric `code`, else its `type` if native."""
    stated = explicit_status(err.get("message"))
    if stated is not None:
        return errors.error_type_for_status(stated)
    code = err.get("code")
    try:
        status = int(str(code).strip())
    except (TypeError, ValueError):
        status = 0
    if 400 <= status <= 599:
        return errors.error_type_for_status(status)
    etype = err.get("type")
    if isinstance(etype, str) and etype in errors.STATUS_BY_ERROR_TYPE:
        return etype
    return "api_error"


def _classify(parsed: Any) -> str:
    """The label of the (non-native) outer shape that held a native error."""
    if not (isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)):
        return "embedded-json"
    message = parsed["error"].get("message")
    if not isinstance(message, str):
        return "litellm-passthrough" if isinstance(message, dict) else "embedded-json"
    head = message.lstrip()
    if head.startswith(("b'", 'b"')):
        return "litellm-bytes-repr"
    if _LITELLM_PREFIX.match(head):
        return "litellm-chat"
    if "Received Model Group=" in message:
        return "litellm-routed"
    return "litellm-passthrough"


def _inner_of_native(native: dict, depth: int, budget: _Budget) -> dict | None:
    """The native error wrapped in `native`'s message (innermost), or None if there is none."""
    if depth >= MAX_DEPTH:
        return None
    message = native["error"].get("message")
    if isinstance(message, str):
        return _find_native(message, depth + 1, budget)
    if isinstance(message, dict | list):
        return _search(message, depth + 1, budget)
    return None


def _search(value: Any, depth: int, budget: _Budget) -> dict | None:
    """The innermost native error in a parsed JSON value (strings are searched too), or None."""
    if depth >= MAX_DEPTH or not budget.take():
        return None
    if errors.is_native_error(value):
        if _untyped(value):
            # A native-shaped LiteLLM wrapper: only what it wraps counts.
            return _inner_of_native(value, depth, budget)
        return _inner_of_native(value, depth, budget) or value
    if isinstance(value, str):
        return _find_native(value, depth, budget)
    if isinstance(value, dict):
        # The likely places first.
        keys = [k for k in ("error", "message", "detail") if k in value]
        keys += [k for k in value if k not in ("error", "message", "detail")]
        for key in keys:
            found = _search(value[key], depth + 1, budget)
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        for item in value:
            found = _search(item, depth + 1, budget)
            if found is not None:
                return found
    return None


def _find_native(text: str, depth: int, budget: _Budget) -> dict | None:
    """The innermost native error inside a string: the first `{`, `b'` / `b"` or JSON string literal that
    holds one.

    Candidates are taken in order of position, and each is decoded at its own escaping level. A JSON string
    literal (an envelope quoted inside another) comes before anything inside it, so its decoded text is
    searched first: a bytes literal (or dict repr) inside it is valid Python at both levels (`\\\\` and
    `\\"` are bytes escapes too), and read in place it loses one level of backslashes (a control character
    in the native message comes out as the text `\\u001f`). Only when the decoded text holds nothing is the
    inside scanned in place, in case the `"` was a stray or closing quote.
    """
    if depth >= MAX_DEPTH or not text:
        return None
    if "{" not in text:
        return None
    pos = 0
    while True:
        match = _START.search(text, pos)
        if match is None:
            break
        if not budget.take():
            return None
        start = match.start()
        kind = text[start]
        if kind == "{":
            value, end = _object_at(text, start, budget)
        elif kind == '"':
            value, end = _string_at(text, start)
        else:
            value, end = _bytes_at(text, start)
        if end is None:
            pos = start + 1
            continue
        found = _search(value, depth + 1, budget)
        if found is not None:
            return found
        # A JSON object is exact: nothing inside it is left to find. A bytes literal may have been
        # mis-delimited by text around it, and a `"` may have been a closing quote (its "string" then ends
        # inside the next real one), so look inside them again.
        pos = end if kind == "{" and end > start else start + (1 if kind == '"' else 2)
    # A string escaped once more than JSON needs: unescape one level and look again.
    if '\\"' in text and budget.take():
        try:
            unescaped = _JSON_ESCAPE.sub(lambda m: json.loads(f'"{m.group(0)}"'), text)
        except ValueError:  # an escape JSON does not have
            return None
        if unescaped != text:
            return _find_native(unescaped, depth + 1, budget)
    return None


def _object_at(text: str, start: int, budget: _Budget) -> tuple[Any, int | None]:
    """The JSON object (or Python dict literal) starting at `text[start] == "{"`, and where it ends."""
    try:
        value, end = _DECODER.raw_decode(text, start)
        return value, end
    except (ValueError, RecursionError):  # not JSON (or nested past the recursion limit)
        pass
    # A Python dict repr, e.g. `{'type': 'error', 'error': {…}}`.
    after = text[start + 1 : start + 64].lstrip()
    if not after.startswith("'") or not budget.take_slow():
        return None, None
    end = _balanced_end(text, start)
    if end is None or end - start > MAX_LITERAL_CHARS:
        return None, None
    value = _literal(text[start:end])
    return (value, end) if isinstance(value, dict) else (None, None)


def _string_at(text: str, start: int) -> tuple[Any, int | None]:
    """The JSON string literal starting at `text[start] == '"'`, decoded, and where it ends.

    (None, None) when it is not one, or when decoding changes nothing that matters (no escape in it, or no
    `{` in its text): then the `"` may as well be a closing quote, and the scan goes on right after it.
    """
    try:
        value, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, str) or "{" not in value or text.find("\\", start, end) < 0:
        return None, None
    return value, end


def _bytes_at(text: str, start: int) -> tuple[Any, int | None]:
    """The Python bytes literal starting at `text[start:start+2] in ("b'", 'b"')`, decoded as UTF-8."""
    match = _BYTES_LITERAL.match(text, start, min(len(text), start + MAX_LITERAL_CHARS))
    if match is None or "{" not in match.group(0):
        return None, None
    value = _literal(match.group(0))
    if not isinstance(value, bytes):
        return None, None
    return value.decode("utf-8", "replace"), match.end()


def _literal(source: str) -> Any:
    """`ast.literal_eval(source)` (evaluates literals only, never code), or None when it is not one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence '\\u'
            return ast.literal_eval(source)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # what literal_eval raises on
        return None  # a non-literal; MemoryError: CPython's parser on very deep nesting


def _balanced_end(text: str, start: int) -> int | None:
    """The index after the `}` matching `text[start] == "{"`, skipping quoted strings; None if unbalanced."""
    depth = 0
    quote = ""
    i = start
    n = min(len(text), start + MAX_LITERAL_CHARS)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in ("'", '"'):
            quote = c
        elif c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
            if depth == 0:
                return i + 1 if c == "}" else None
            if depth < 0:
                return None
        i += 1
    return None
