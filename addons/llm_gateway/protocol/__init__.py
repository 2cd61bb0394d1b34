"""What bytes mean, with no I/O and no mitmproxy: the Anthropic Messages wire format (messages, errors, token
counts, partial JSON), error envelopes of other proxies, SSE, the one JSON codec, content decoding, hosts and
paths, request headers, and a Message as text for people.
"""
