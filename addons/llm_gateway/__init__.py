"""The LLM interception gateway: one small mitmproxy addon per concern, and the plain modules they share."""
