"""`scripts/mint-token NAME` (`python -m llm_gateway.tools.mint_token`): a new gateway token and the
rule line that admits it (policy/credentials.mint).
"""

from __future__ import annotations

import argparse
import sys

from llm_gateway.policy.credentials import mint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mint-token",
        description="Mint a gateway token: prints the token (once: store it now) and the line to add under "
        "credentials.tokens in the rule file, which holds only the token's SHA-256.",
    )
    p.add_argument("name", help="who holds it (a team, an agent pool): the `principal` of its records")
    p.add_argument("--upstream", help="the credentials.upstream key it is exchanged for (default: the first)")
    p.add_argument("--client", help="accept it only from this client (a name from the clients section)")
    args = p.parse_args(argv)
    try:
        token, line = mint(args.name, args.upstream, args.client)
    except ValueError as e:
        p.error(str(e))
    print(f"# gateway token for {args.name} (shown once; give it to the agent as ANTHROPIC_API_KEY):")
    print(token)
    print("# add under credentials.tokens in the rule file:")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
