"""The fence: the only code that touches mitmproxy internals (layers, serialisers, server bookkeeping, private
names), each behind a plain function. It imports nothing of the gateway. A mitmproxy upgrade breaks here or
nowhere, and tests/unit/mitm/test_contract.py names what it broke.
"""
