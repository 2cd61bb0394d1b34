"""Leaf helpers that know nothing of the gateway: globs, escaping for logs, a per-object cache, file stamps, and
the CA's files.
"""
