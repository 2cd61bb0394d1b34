"""What a usage record means (`schema.outcome`), totals over records, and reading and writing the record log.
No mitmproxy: scripts/usage_report runs wherever the log is copied.
"""
