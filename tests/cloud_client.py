"""Drive the Anthropic Python SDK's cloud clients (`AnthropicBedrock`, `AnthropicVertex`) in a process of their own.

Egress mode is set up as users do it, through the environment (HTTPS_PROXY, SSL_CERT_FILE, AWS_* keys); base-URL
mode with `--base-url`. Prints one JSON object: {"ok": true, "message": {...}} or {"ok": false, "error": class
name, "status", "body"}.

    python tests/cloud_client.py bedrock|vertex create|stream [--base-url URL] [--header k=v]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"


def run(cloud: str, call: str, *, env: dict[str, str], base_url: str | None = None,
        headers: dict[str, str] | None = None, timeout: float = 60) -> dict:
    args = [sys.executable, str(Path(__file__)), cloud, call]
    if base_url:
        args += ["--base-url", base_url]
    for k, v in (headers or {}).items():
        args += ["--header", f"{k}={v}"]
    clean = {k: v for k, v in os.environ.items()
             if not k.upper().endswith("_PROXY") and k != "SSL_CERT_FILE" and not k.startswith(("AWS_", "GOOGLE_"))}
    done = subprocess.run(args, env={**clean, **env}, capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"cloud client failed ({done.returncode}):\n{done.stdout}\n{done.stderr}") from None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cloud", choices=["bedrock", "vertex"])
    parser.add_argument("call", choices=["create", "stream"])
    parser.add_argument("--base-url")
    parser.add_argument("--header", action="append", default=[])
    a = parser.parse_args()
    import anthropic

    headers = dict(h.split("=", 1) for h in a.header)
    if a.cloud == "bedrock":  # keys and region from the environment (AWS_ACCESS_KEY_ID, …, AWS_REGION)
        client = anthropic.AnthropicBedrock(base_url=a.base_url, max_retries=0, default_headers=headers)
        model = BEDROCK_MODEL
    else:  # a ready access token: the SDK then needs no Google credentials of its own
        client = anthropic.AnthropicVertex(region="us-east5", project_id="demo-project", base_url=a.base_url,
                                           access_token=os.environ.get("VERTEX_TEST_TOKEN"), max_retries=0,
                                           default_headers=headers)
        model = VERTEX_MODEL
    request = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}
    try:
        if a.call == "create":
            message = client.messages.create(**request)
        else:
            with client.messages.stream(**request) as stream:
                message = stream.get_final_message()
        print(json.dumps({"ok": True, "message": message.model_dump(mode="json")}))
    except anthropic.APIStatusError as e:
        print(json.dumps({"ok": False, "error": type(e).__name__, "status": e.status_code, "body": e.body}))
    except anthropic.APIError as e:
        print(json.dumps({"ok": False, "error": type(e).__name__, "status": None, "body": getattr(e, "body", None),
                          "message": str(e)}))


if __name__ == "__main__":
    main()
