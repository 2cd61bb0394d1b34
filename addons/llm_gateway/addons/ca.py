"""One CA for every replica: the gateway can start from a CA made once instead of making its own.

mitmproxy reads its CA from `confdir` (`mitmproxy-ca.pem`: key and certificate; `mitmproxy-ca-cert.pem`:
what clients trust) and makes a new one where there is none, so every replica of a Deployment would
have its own and agents could trust only one of them. `gateway_ca` names a CA made once by
`scripts/make-ca`: a folder holding `tls.crt` and `tls.key` (a Kubernetes TLS Secret mounted as a
volume), a folder in mitmproxy's own layout, or one PEM file with the key and the certificate.

The gateway copies that CA into a private folder of its own (mode 0700, key 0600) in mitmproxy's layout
and points `confdir` there, so mitmproxy's TLS addon reloads its certificate store from it. The
configured confdir (often ~/.mitmproxy, holding someone's own CA) is never overwritten.

    python -m llm_gateway.ca [--out DIR] [--cn NAME] [--days N]    # what scripts/make-ca runs
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from mitmproxy import ctx, exceptions

from llm_gateway.util.cafiles import CA, CAError, install, read

logger = logging.getLogger("llm_gateway.ca")


# -- making one ----------------------------------------------------------------------------------------


# -- reading one -----------------------------------------------------------------------------------------


# -- the addon -------------------------------------------------------------------------------------------


class GatewayCA:
    def __init__(self) -> None:
        self.folder: Path | None = None  # the private confdir, made on first use
        self.ca: CA | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_ca",
            str,
            "",
            "Start from this CA instead of the one in confdir, so that every replica presents the same one: "
            "a folder holding tls.crt and tls.key (a Kubernetes TLS Secret), or mitmproxy-ca.pem, or a PEM file "
            "with both the key and the certificate. Made once by scripts/make-ca.",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_ca" not in updated or not ctx.options.gateway_ca:
            return
        source = os.path.expanduser(ctx.options.gateway_ca)
        try:
            ca = read(source)
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="llm-gateway-ca-"))  # 0700
            install(ca, self.folder)
        except (CAError, OSError) as e:
            if self.ca is not None:  # a running gateway refuses the change and keeps its CA
                raise exceptions.OptionsError(f"gateway_ca: {e}") from None
            logger.error(f"gateway_ca: {e}")  # at start-up: mitmdump exits, rather than run with a CA of its own
            return
        self.ca = ca
        # Setting confdir makes mitmproxy's TlsConfig load its certificate store from the folder.
        ctx.options.update(confdir=str(self.folder))
        subject = ca.cert.subject.rfc4514_string()
        logger.info(f"CA {subject} (sha256 {ca.fingerprint[:16]}) from {source}; confdir is now {self.folder}")

    def done(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


# -- scripts/make-ca -------------------------------------------------------------------------------------

