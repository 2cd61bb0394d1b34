"""Drive the real Anthropic Python SDK as an agent would, in a process of its own.

Egress mode is configured the way users do it, through the environment (HTTPS_PROXY, SSL_CERT_FILE),
which the SDK reads when it starts; so each call runs in a fresh interpreter. Prints one JSON object:
{"ok": true, "message": {...}} or {"ok": false, "error": class name, "status", "type", "request_id", "message"}.

    python tests/sdk_client.py create|stream|create-stream [--async] [--base-url URL] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(call: str, *, base_url: str | None = None, env: dict[str, str] | None = None, use_async: bool = False,
        model: str = "claude-test-1", headers: dict[str, str] | None = None, max_retries: int = 0,
        timeout: float = 60, pad: int = 0) -> dict:
    """Run one SDK call in a subprocess and return what it printed."""
    args = [sys.executable, str(Path(__file__)), call, "--model", model, "--max-retries", str(max_retries)]
    if base_url:
        args += ["--base-url", base_url]
    if use_async:
        args.append("--async")
    if pad:
        args += ["--pad", str(pad)]
    for k, v in (headers or {}).items():
        args += ["--header", f"{k}={v}"]
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "SSL_CERT_FILE"}
    clean.setdefault("ANTHROPIC_API_KEY", "sk-ant-test-key-never-logged")
    done = subprocess.run(args, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"SDK client failed ({done.returncode}):\n{done.stdout}\n{done.stderr}") from None


def without_nulls(value):
    """A Message with its null fields dropped: the SDK's accumulator adds some the API leaves out."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def _request(model: str, pad: int = 0) -> dict:
    """A Messages request; `pad` bytes more make it a long conversation (turns of about 4 KB, as an agent's)."""
    turns = []
    for i in range(pad // 4096):
        turns += [{"role": "user", "content": [{"type": "text", "text": f"{i:08d} " + "lorem ipsum " * 328}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    return {"model": model, "max_tokens": 64, "messages": [*turns, {"role": "user", "content": "hello"}]}


async def _call(args) -> dict:
    import anthropic

    kw = {"max_retries": args.max_retries, "default_headers": dict(h.split("=", 1) for h in args.header)}
    if args.base_url:
        kw["base_url"] = args.base_url
    client = (anthropic.AsyncAnthropic if args.use_async else anthropic.Anthropic)(**kw)
    req = _request(args.model, args.pad)

    async def maybe(x):
        return await x if args.use_async else x

    try:
        if args.call == "create":
            message = await maybe(client.messages.create(**req))
        elif args.call == "create-stream":  # create(stream=True): the raw events, accumulated by us
            stream = await maybe(client.messages.create(**req, stream=True))
            events = []
            if args.use_async:
                async for ev in stream:
                    events.append(ev.to_dict())
            else:
                events = [ev.to_dict() for ev in stream]
            return {"ok": True, "events": events}
        else:
            if args.use_async:
                async with client.messages.stream(**req) as stream:
                    message = await stream.get_final_message()
            else:
                with client.messages.stream(**req) as stream:
                    message = stream.get_final_message()
        return {"ok": True, "message": message.to_dict()}
    except anthropic.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        return {
            "ok": False, "error": type(e).__name__, "status": e.status_code,
            "type": getattr(e, "type", None) or error.get("type"), "request_id": e.request_id, "message": str(e),
        }
    except anthropic.APIError as e:
        return {"ok": False, "error": type(e).__name__, "status": None, "type": None, "request_id": None, "message": str(e)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("call", choices=["create", "stream", "create-stream"])
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--base-url")
    p.add_argument("--model", default="claude-test-1")
    p.add_argument("--max-retries", type=int, default=0)
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--pad", type=int, default=0, help="make the request about this many bytes larger")
    print(json.dumps(asyncio.run(_call(p.parse_args()))))


if __name__ == "__main__":
    main()
