"""The command lines (scripts/usage_report, make-ca, mint-token; the llm-gateway-dump console script). They use
policy, records, protocol and util; nothing the gateway runs imports them.
"""
