"""The gateway holds the cloud credentials (`clouds:` in the rules, policy/clouds.py): each Bedrock or Vertex request
that reaches the base-URL listener is signed with the gateway's own AWS credentials (SigV4, over the final host,
path and body) or authorized with its Google access token, so agents hold a gateway token and no cloud secret.

- AWS: botocore's default credential chain (environment, shared profile, web identity for Kubernetes service
  accounts, container and instance roles), resolved once and refreshed by botocore itself; `SigV4Auth` signs.
- Google: google-auth's application default credentials; the token is refreshed off the event loop (a thread),
  one refresh at a time, and cached until google-auth says it is about to expire.

Credential look-ups and refreshes can do network I/O (STS, the metadata server, Google's token endpoint): they run
in a thread, never on mitmproxy's event loop, while the flow waits (mitmproxy's intercept and resume). With the
credentials in hand (almost every request) the hook signs at once: no thread, no coroutine. The signature and the token go into the wire bytes only
(mitm/serializers.py), like the upstream Anthropic key: no flow, record, log or mitmweb view holds them.

Claude Code's Vertex paths come with or without `/v1` (ANTHROPIC_VERTEX_BASE_URL): the upstream always gets `/v1`.
Requests in egress mode are the client's, signed by it: never touched here. Translated requests (an Anthropic
request a `provider: bedrock` route sends to Bedrock, addons/translate.py) are always signed, in either mode.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

import google.auth
import google.auth.transport.urllib3
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.session import Session
from mitmproxy import http

from llm_gateway.mitm import serializers
from llm_gateway.pipeline import exchange
from llm_gateway.pipeline.answer import native_answer
from llm_gateway.policy.clouds import BedrockAuth, VertexAuth, bedrock_region
from llm_gateway.policy.failover import serving
from llm_gateway.protocol.providers import BEDROCK, VERTEX
from llm_gateway.util.logsafe import clean
from llm_gateway.util.secretmask import LOG_FILTER

if TYPE_CHECKING:
    from llm_gateway.addons.rulefile import RuleFile

logger = logging.getLogger("llm_gateway.cloudauth")

# What a client may have sent as its own cloud credentials: never forwarded once the gateway signs.
CLIENT_AUTH_HEADERS = ("authorization", "x-api-key", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")


class CloudCredentials:
    """Signs base-URL Bedrock requests and authorizes base-URL Vertex requests with the gateway's credentials."""

    def __init__(self, rule_file: RuleFile) -> None:
        self.rule_file = rule_file
        self._aws: dict[str | None, tuple[Any, str | None]] = {}  # profile -> (botocore credentials, configured region)
        self._google: dict[tuple[str, ...], Any] = {}  # scopes -> google-auth credentials
        self._lock = threading.Lock()  # one look-up or refresh at a time; the others then find it done
        self._tasks: set[asyncio.Task] = set()
        self._held: weakref.WeakKeyDictionary[http.HTTPFlow, list[str]] = weakref.WeakKeyDictionary()

    def request(self, flow: http.HTTPFlow) -> None:
        ex = exchange.of(flow)
        if ex is None or flow.response or ex.provider not in (BEDROCK, VERTEX) or not (ex.mode == "reverse" or ex.translated):
            return
        rule = ex.rules.clouds.bedrock if ex.provider == BEDROCK else ex.rules.clouds.vertex
        if ex.translated and ex.provider == BEDROCK:  # an Anthropic request: always signed; the route may name the region
            route = serving(ex.route, len(ex.failed_upstreams))
            region = route.region if route is not None and route.region else (rule.region if rule else None)
            rule = BedrockAuth(region, rule.profile if rule else None)
        elif ex.translated:
            rule = rule or VertexAuth()
        if rule is None:
            return
        ready = self._ready(ex.provider, rule)
        if ready is not None:
            try:
                self._apply(flow, ex, rule, ready)
            except LookupError as e:  # no region
                self._refuse(flow, ex, e)
            return
        flow.intercept()  # mitmproxy holds the request until `resume`
        task = asyncio.get_running_loop().create_task(self._fetch_and_apply(flow, ex, rule))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_and_apply(self, flow: http.HTTPFlow, ex: exchange.Exchange, rule: Any) -> None:
        try:
            material = await asyncio.to_thread(self._fetch, ex.provider, rule)
            self._apply(flow, ex, rule, material)
        except Exception as e:  # no credentials, a failed refresh: the client gets a native error, the log why
            self._refuse(flow, ex, e)
        finally:
            flow.resume()

    @staticmethod
    def _refuse(flow: http.HTTPFlow, ex: exchange.Exchange, e: Exception) -> None:
        logger.error(f"{ex.provider}: cannot sign for {clean(ex.host + ex.path)}: {clean(type(e).__name__)}: {clean(e)}")
        flow.response = native_answer("api_error", f"the gateway has no usable {ex.provider} credentials (see its log)",
                                      {"x-should-retry": "false"})

    # -- credentials: `_ready` without I/O, `_fetch` in a thread ---------------------------------------------------

    def _ready(self, provider: str, rule: Any) -> Any | None:
        """The credential material when it needs no I/O now (found before, not about to expire), else None."""
        if provider == BEDROCK:
            found = self._aws.get(rule.profile)
            if found is None:
                return None
            credentials, region = found
            refresh_needed = getattr(credentials, "refresh_needed", None)  # botocore's RefreshableCredentials
            if refresh_needed is not None and refresh_needed():
                return None
            return credentials.get_frozen_credentials(), region
        credentials = self._google.get(rule.scopes)
        return credentials.token if credentials is not None and credentials.valid else None

    def _fetch(self, provider: str, rule: Any) -> Any:
        """The credential material, looked up or refreshed (network I/O: a thread only)."""
        with self._lock:
            if provider == BEDROCK:
                found = self._aws.get(rule.profile)
                if found is None:
                    session = Session(profile=rule.profile)
                    credentials = session.get_credentials()
                    if credentials is None:
                        raise LookupError("botocore's default credential chain found no AWS credentials")
                    found = self._aws[rule.profile] = (credentials, session.get_config_variable("region"))
                credentials, region = found
                return credentials.get_frozen_credentials(), region  # refreshes when due
            credentials = self._google.get(rule.scopes)
            if credentials is None:
                credentials, _ = google.auth.default(scopes=list(rule.scopes))
                self._google[rule.scopes] = credentials
            if not credentials.valid:  # none yet, or about to expire (google-auth keeps a margin)
                credentials.refresh(google.auth.transport.urllib3.Request(urllib3.PoolManager()))
            return credentials.token

    # -- applying them -------------------------------------------------------------------------------------------

    def _apply(self, flow: http.HTTPFlow, ex: exchange.Exchange, rule: Any, material: Any) -> None:
        request = flow.request
        for name in CLIENT_AUTH_HEADERS:
            request.headers.pop(name, None)
        if ex.provider == BEDROCK:
            frozen, configured = material
            region = rule.region or bedrock_region(request.host) or configured
            if not region:
                raise LookupError("no AWS region: set clouds.bedrock.region or AWS_REGION")
            # SigV4 over the final method, URL (host and port as sent) and body: nothing changes them after this hook
            url = f"{request.scheme}://{request.host_header}{request.path}"
            signed = AWSRequest(method=request.method, url=url, data=request.get_content(strict=False) or b"",
                                headers={"content-type": request.headers.get("content-type", "application/json")})
            LOG_FILTER.remember([frozen.secret_key, frozen.token or ""])  # before botocore's debug lines quote them
            SigV4Auth(frozen, "bedrock", region).add_auth(signed)
            request.headers["x-amz-date"] = signed.headers["X-Amz-Date"]
            self._place(flow, "authorization", signed.headers["Authorization"], "AWS SigV4 signature")
            if frozen.token:
                self._place(flow, "x-amz-security-token", frozen.token, "AWS session token")
            ex.note(f"signed by the gateway (SigV4, {region})")
        else:
            if request.path.startswith("/projects/"):  # Claude Code's ANTHROPIC_VERTEX_BASE_URL form
                request.path = "/v1" + request.path
            self._place(flow, "authorization", f"Bearer {material}", "Google access token")
            ex.note("authorized by the gateway (Google application default credentials)")

    def _place(self, flow: http.HTTPFlow, name: str, value: str, label: str) -> None:
        """The value goes into the wire bytes only; the flow holds a placeholder (mitm/serializers.py); no log
        line shows it from now on (util/secretmask.py)."""
        LOG_FILTER.remember([value])
        placeholder = serializers.hold(value, label, flow.request.host, flow.request.port)
        self._held.setdefault(flow, []).append(placeholder)
        flow.request.headers[name] = placeholder

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        serializers.release(self._held.pop(flow, []))  # sent: the real values are forgotten

    def error(self, flow: http.HTTPFlow) -> None:
        serializers.release(self._held.pop(flow, []))
