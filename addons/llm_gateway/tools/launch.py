"""`llm-gateway-dump`: mitmdump with standard output kept for the gateway's JSON records.

A platform's log collector (Fluent Bit, Vector, Promtail) reads the records as JSON lines from standard
output (`gateway_log=-`). mitmdump prints its own log (TermLog) and its flow lines (Dumper) to whatever
`sys.stdout` is when it builds them, before any addon runs (its first line, "Loading script", comes
before the gateway is even imported), and has no option to send them elsewhere. So this starts mitmdump
with `sys.stdout` set to standard error; the records still go to the process's real standard output,
`sys.__stdout__`, which nothing else writes to. Arguments are mitmdump's.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from mitmproxy.tools.main import mitmdump

    sys.stdout = sys.stderr
    mitmdump(argv)


if __name__ == "__main__":
    main()
