"""The LLM interception gateway, as mitmproxy loads it: `mitmdump -s addons/gateway.py`.

Thin on purpose: `llm_gateway.app.default_addons()` composes one object per concern, in the order
their hooks must run (the tests drive the same list), and mitmproxy gets them as one addon
(`llm_gateway.app.Dispatcher`), which calls them in that order. The parts live in the `llm_gateway` package
beside this file.
"""

import os
import sys

# mitmproxy puts this folder on sys.path only while it loads the script; keep it there so the
# package also resolves when it is not installed.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from llm_gateway.app import Dispatcher, default_addons, refuse_repeated_options  # noqa: E402

refuse_repeated_options()
# Hook order matters (see app.py); mitmproxy sees one addon, which calls the concerns in that order
# (app.py says why).
addons = [Dispatcher(default_addons())]
