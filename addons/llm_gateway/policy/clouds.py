"""`clouds:`: the gateway holds the cloud credentials for requests that arrive on the base-URL listener unsigned
(Claude Code's `CLAUDE_CODE_SKIP_BEDROCK_AUTH=1` / `CLAUDE_CODE_SKIP_VERTEX_AUTH=1`, or an SDK pointed at the
gateway): addons/cloudauth.py signs each one with the gateway's own AWS credentials (SigV4) or Google application
default credentials. Egress-mode requests are the client's, signed by it, and never changed.

    clouds:
      bedrock: {region: us-east-1}     # region: optional, else from the upstream host, else the AWS configuration
      vertex: {}                       # Google's application default credentials

The rule datatypes and their reader; rules.py calls `read` with its reader (its error quality: file, line, reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# AWS region names: us-east-1, eu-central-2, us-gov-west-1, ap-southeast-5, …
REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")
# Vertex AI locations: us-east5, europe-west1, asia-southeast1, global
VERTEX_REGION = re.compile(r"global|[a-z]+-[a-z]+\d{1,2}")
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


@dataclass(frozen=True)
class BedrockAuth:
    """Sign Bedrock requests with botocore's default credential chain (environment, shared profile, web identity
    for Kubernetes service accounts, container and instance roles). `region`: the SigV4 scope; None: from the
    upstream host `bedrock-runtime.<region>.amazonaws.com`, else the AWS configuration (AWS_REGION, the profile)."""

    region: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class VertexAuth:
    """Authorize Vertex requests with Google's application default credentials (GOOGLE_APPLICATION_CREDENTIALS,
    gcloud's, workload identity, the metadata server), scoped to `scopes`."""

    scopes: tuple[str, ...] = (CLOUD_PLATFORM_SCOPE,)


@dataclass(frozen=True)
class Clouds:
    bedrock: BedrockAuth | None = None
    vertex: VertexAuth | None = None


def read(reader: Any, node: Any) -> Clouds:
    """The `clouds` section, read with rules.py's `_Reader` (mapping, string, fail)."""
    m = reader.mapping(node, "clouds", {"bedrock": False, "vertex": False})
    bedrock = vertex = None
    if "bedrock" in m:
        b = reader.mapping(m["bedrock"], "clouds.bedrock", {"region": False, "profile": False})
        region = reader.string(b["region"], "clouds.bedrock.region") if "region" in b else None
        if region is not None and not REGION.fullmatch(region):
            raise reader.fail(b["region"], f"clouds.bedrock.region {region!r} is not an AWS region name (e.g. us-east-1)")
        profile = reader.string(b["profile"], "clouds.bedrock.profile") if "profile" in b else None
        bedrock = BedrockAuth(region, profile)
    if "vertex" in m:
        v = reader.mapping(m["vertex"], "clouds.vertex", {"scopes": False})
        scopes = tuple(reader.string(s, f"clouds.vertex.scopes[{i}]") for i, s in enumerate(reader.seq(v["scopes"], "clouds.vertex.scopes"))) \
            if "scopes" in v else VertexAuth.scopes
        vertex = VertexAuth(scopes)
    return Clouds(bedrock, vertex)


def read_translation(reader: Any, m: dict, where: str) -> dict[str, Any]:
    """A route's `provider`, `region`, `project` and `models` (Route's fields), read with rules.py's `_Reader`:

        - {match: {api: anthropic}, upstream: "https://bedrock-runtime.us-east-1.amazonaws.com", provider: bedrock,
           region: us-east-1, models: {"claude-sonnet-4-5*": "us.anthropic.claude-sonnet-4-5-20250929-v1:0"}}
        - {match: {api: anthropic}, upstream: "https://us-east5-aiplatform.googleapis.com", provider: vertex,
           region: us-east5, project: my-project}
    """
    found: dict[str, Any] = {}
    names = {"anthropic": "anthropic", "bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai"}
    provider = names[reader.choice(m["provider"], f"{where}.provider", tuple(names))] if "provider" in m else "anthropic"
    found["provider"] = provider
    if "region" in m:
        region = reader.string(m["region"], f"{where}.region")
        pattern, example = (VERTEX_REGION, "us-east5") if provider == "gcp.vertex_ai" else (REGION, "us-east-1")
        if not pattern.fullmatch(region):
            raise reader.fail(m["region"], f"{where}.region {region!r} is not a region name (e.g. {example})")
        found["region"] = region
    if "project" in m:
        found["project"] = reader.string(m["project"], f"{where}.project")
    if "models" in m:
        pairs = []
        for key, value in reader.mapping_any(m["models"], f"{where}.models"):
            pattern = reader.glob(key, f"{where}.models key")
            pairs.append((pattern, reader.string(value, f"{where}.models[{pattern.pattern!r}]")))
        found["models"] = tuple(pairs)
    extra = [k for k in ("region", "project", "models") if k in m]
    if provider == "anthropic" and extra:
        raise reader.fail(m[extra[0]], f"{where}: {extra[0]} needs provider: bedrock or vertex")
    if provider == "aws.bedrock" and "project" in m:
        raise reader.fail(m["project"], f"{where}: project is for provider: vertex")
    if provider == "gcp.vertex_ai" and not ("region" in m and "project" in m):
        raise reader.fail(m["provider"], f"{where}: provider: vertex needs region and project")
    return found


def bedrock_region(host: str) -> str | None:
    """The region in `bedrock-runtime.<region>.amazonaws.com` (also `-fips`), else None."""
    m = re.fullmatch(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com", host.lower())
    return m.group(1) if m else None
