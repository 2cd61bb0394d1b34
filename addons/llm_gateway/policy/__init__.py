"""rules.yaml as plain frozen data (`spec`), its reader (`rules`), and the decisions made on it: routing, client
detection, egress, key custody, pricing, cache-break explanations. Pure functions of the rules and plain
values: no flows, no mitmproxy context.
"""
