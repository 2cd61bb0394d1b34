"""docs/configuration.md against the real parser and the real options, so the reference cannot drift.

The keys the parser accepts are found by running it: every mapping it reads (`_Reader.mapping`) names its
allowed keys, and it reads the top level of every file, and every section present in the default rules.yaml or
in the page's own YAML examples (which must parse). A new section (`quotas:`) shows up at the top level at once;
its keys show up once the page has an example of it. The page's tables name each key as a row (`usage.log`) or
in `code` in the row of the list or mapping holding it (`routes[]`: `upstream`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from llm_gateway.app import default_addons
from llm_gateway.policy import rules as rules_mod
from llm_gateway.addons.rulefile import RuleFile

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\|\s*(`[^|]*`)\s*\|(.*)\|\s*$")
CODE = re.compile(r"`([^`]+)`")


def page() -> str:
    return PAGE.read_text()


def yaml_examples(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, re.S)


def parser_keys(texts: list[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """{mapping path: allowed keys} for every mapping the parser read in these files; paths as in the page:
    "" for the top level, `routes[]` for a list's items, `routes[].match` inside them."""
    seen: dict[str, tuple[str, ...]] = {}
    original = rules_mod._Reader.mapping

    def recording(self, node, where, keys):
        path = "" if where == "the rule file" else re.sub(r"\[\d+\]", "[]", where)
        seen[path] = tuple(dict.fromkeys((*seen.get(path, ()), *keys)))
        return original(self, node, where, keys)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules_mod._Reader, "mapping", recording)
        for text, source in texts:
            rules_mod.parse(text, source)
    return seen


def documented_rows(text: str) -> dict[str, set[str]]:
    """{key path of a row, `[]` kept: the names in `code` in its meaning} for the rule-file tables."""
    part = text.split("## mitmproxy options")[0]
    rows = {}
    for line in part.splitlines():
        m = ROW.match(line)
        if m:
            for key in CODE.findall(m.group(1)):
                rows[key] = set(CODE.findall(m.group(2)))
    return rows


def bare(path: str) -> str:
    return path.replace("[]", "")


def test_the_pages_examples_are_valid_rule_files():
    examples = yaml_examples(page())
    assert examples, "docs/configuration.md has no ```yaml example"
    for n, text in enumerate(examples):
        rules_mod.parse(text, f"docs/configuration.md example {n + 1}")  # raises RulesError with file:line:reason


def test_every_key_the_parser_accepts_is_documented():
    text = page()
    sources = [(ROOT.joinpath("rules.yaml").read_text(), str(ROOT / "rules.yaml"))]
    sources += [(t, f"docs/configuration.md example {n + 1}") for n, t in enumerate(yaml_examples(text))]
    accepted = parser_keys(sources)
    rows = documented_rows(text)
    by_bare = {bare(k): names for k, names in rows.items()}
    missing = []
    for where, keys in accepted.items():
        for key in keys:
            path = f"{where}.{key}" if where else key
            if (bare(path) in by_bare or key in by_bare.get(bare(where), set())
                    or any(k.startswith(bare(path) + ".") for k in by_bare)):  # a section with rows of its own
                continue
            missing.append(f"`{path}`" + (f" (a key of `{where}`)" if where else " (a top-level section)"))
    assert not missing, (
        "docs/configuration.md does not document rule key(s) the parser accepts: " + ", ".join(missing)
        + ". Add a row `| `<key>` | meaning |` to the rule-file table, or name the key in `code` in the row of "
        "the section holding it; for a new section also add it to the example with every section, so its own "
        "keys are checked too."
    )


def test_every_documented_key_is_one_the_parser_accepts():
    text = page()
    sources = [(ROOT.joinpath("rules.yaml").read_text(), str(ROOT / "rules.yaml"))]
    sources += [(t, f"example {n + 1}") for n, t in enumerate(yaml_examples(text))]
    accepted = parser_keys(sources)
    known = set()
    for where, keys in accepted.items():
        known.add(bare(where))
        known.update(bare(f"{where}.{k}" if where else k) for k in keys)
    unknown = [k for k in documented_rows(text) if bare(k) not in known]
    assert not unknown, f"docs/configuration.md documents key(s) the parser refuses: {unknown}"


def test_every_gateway_option_is_documented():
    text = page().split("## mitmproxy options", 1)
    assert len(text) == 2, "docs/configuration.md lost its '## mitmproxy options and commands' section"
    documented = set()
    for line in text[1].splitlines():
        m = ROW.match(line)
        if m:
            documented.update(CODE.findall(m.group(1)))
    with taddons.context(*default_addons(RuleFile())) as tctx:
        options = {name for name in tctx.options.keys() if name.startswith("gateway_")}
    assert options - documented == set(), (
        f"gateway options missing from docs/configuration.md's options table: {sorted(options - documented)}"
    )
    assert documented - options == set(), f"documented options no addon registers: {sorted(documented - options)}"
