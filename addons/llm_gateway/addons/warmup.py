"""Warm-up: what the first API request would otherwise pay, paid once when the gateway starts.

- genai-prices loads its price snapshot on first use (about 0.3 s and 77 MB at its peak): without this, the
  first priced exchange after every start or reload waits for it.
- Then `gc.freeze()` (Python's gc docs: "freeze all the objects tracked by gc - move them to a permanent
  generation and ignore them in all the future collections"): the snapshot, mitmproxy's and the gateway's
  start-up objects are about 100,000 objects that live as long as the process. Every full collection walked
  them all (about 30 ms each under load, docs/benchmarks.md); frozen, they are never walked again. A script
  reload leaves the old module's objects frozen: a few MB, once per reload.
"""

from __future__ import annotations

import gc
import logging

from llm_gateway.policy import pricing

logger = logging.getLogger("llm_gateway.warmup")


class Warmup:
    def running(self) -> None:
        try:
            pricing.preload()
        except Exception:  # prices load on first use then; never a reason not to start
            logger.exception("price list")
        gc.collect()  # what start-up left behind is freed, not frozen
        gc.freeze()
