"""The mitmproxy addons, one concern per module (as mitmproxy's own `mitmproxy/addons/`): options, commands, hooks.

They are composed once, in hook order, by `app.default_addons()`, which passes in what several share (the rule
file, the record log, the metrics, the timeouts); no addon imports another. They may use mitmproxy's public
addon API and everything below them (pipeline, mitm, policy, records, protocol, util).
"""
