"""The LLM interception gateway, as mitmproxy loads it: `mitmdump -s addons/gateway.py`.

Thin on purpose: it only composes one addon per concern, in the order their hooks must run.
The parts live in the `llm_gateway` package beside this file.
"""

import os
import sys

# mitmproxy puts this folder on sys.path only while it loads the script; keep it there so the
# package also resolves when it is not installed.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from llm_gateway.rulefile import RuleFile  # noqa: E402
from llm_gateway.routing import ApiRouter  # noqa: E402

rule_file = RuleFile()

addons = [
    rule_file,
    ApiRouter(rule_file),
]
