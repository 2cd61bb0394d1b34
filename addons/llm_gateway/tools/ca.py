"""`scripts/make-ca` (`python -m llm_gateway.tools.ca`): make the CA every replica shares, and print the
kubectl commands that store it as a Secret and give agents its certificate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_gateway.util.cafiles import (
    DEFAULT_CN,
    DEFAULT_DAYS,
    NAMESPACE,
    SECRET_NAME,
    create,
    save,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/make-ca",
        description="Make the CA every gateway replica shares (once), and say how to hand it to Kubernetes.",
    )
    ap.add_argument("--out", default="llm-gateway-ca", help="folder for tls.crt and tls.key (default ./llm-gateway-ca)")
    ap.add_argument("--cn", default=DEFAULT_CN, help=f"the CA's common name (default {DEFAULT_CN!r})")
    ap.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default {DEFAULT_DAYS})")
    ap.add_argument("--namespace", default=NAMESPACE, help=f"namespace in the printed commands (default {NAMESPACE})")
    ap.add_argument("--force", action="store_true", help="replace a CA already in --out")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if (out / "tls.key").exists() and not args.force:
        print(f"make-ca: {out / 'tls.key'} exists; the CA is made once (--force replaces it)", file=sys.stderr)
        return 1
    if args.days < 1:
        print("make-ca: --days must be at least 1", file=sys.stderr)
        return 2
    ca = create(args.cn, args.days)
    cert_path, key_path = save(ca, out)
    print(f"CA {args.cn!r}, sha256 {ca.fingerprint}, valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"  certificate (agents trust it): {cert_path}")
    print(f"  private key (owner-only, keep it out of git): {key_path}")
    print("Create the Secret the gateway mounts:")
    print(f"  kubectl -n {args.namespace} create secret tls {SECRET_NAME} --cert={cert_path} --key={key_path}")
    print("Give agents the certificate (NODE_EXTRA_CA_CERTS, or a bundle for SSL_CERT_FILE):")
    print(f"  kubectl -n <agents namespace> create configmap {SECRET_NAME}-cert --from-file=ca.crt={cert_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
