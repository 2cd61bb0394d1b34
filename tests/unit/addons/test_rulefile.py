"""The rule-file addon: option, start-up refusal, reload on change, last good rules kept."""

import asyncio
import logging
import os

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from llm_gateway.addons import rulefile
from llm_gateway.addons.rulefile import RuleFile

GOOD = "apis:\n  - {name: a, hosts: [x.test], paths: [/v1/messages]}\n"
OTHER = "apis:\n  - {name: b, hosts: [y.test], paths: [/v1/messages]}\n"


def write(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_loads_rules_from_option(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    rf = RuleFile()
    with taddons.context(rf) as tctx:
        tctx.configure(rf, gateway_rules=str(path))
        assert rf.rules.apis[0].name == "a"
        assert rf.rules.source == str(path)


def test_broken_file_at_start_is_an_error_naming_file_and_line(tmp_path, caplog):
    path = tmp_path / "rules.yaml"
    path.write_text("apis:\n  - name: a\n    hosts: [x]\n    paths: [/v1]\n    nope: 1\n")
    rf = RuleFile()
    with taddons.context(rf) as tctx:
        with caplog.at_level(logging.ERROR):
            tctx.configure(rf, gateway_rules=str(path))
        assert f"{path}:5: unknown key 'nope'" in caplog.text
        assert not rf.loaded


def test_broken_option_change_is_refused_and_rules_kept(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text("apis: 7\n")
    rf = RuleFile()
    with taddons.context(rf) as tctx:
        tctx.configure(rf, gateway_rules=str(good))
        with pytest.raises(exceptions.OptionsError, match="bad.yaml:1"):
            tctx.configure(rf, gateway_rules=str(bad))
        assert rf.rules.apis[0].name == "a"


def test_reload_command_keeps_last_good(tmp_path, caplog):
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    rf = RuleFile()
    with taddons.context(rf) as tctx:
        tctx.configure(rf, gateway_rules=str(path))
        write(path, OTHER)
        rf.reload()
        assert rf.rules.apis[0].name == "b"
        write(path, "apis: [\n")
        with caplog.at_level(logging.ERROR):
            rf.reload()
        assert rf.rules.apis[0].name == "b"
        assert "keeping the last good rules" in caplog.text


async def test_watcher_picks_up_edits_and_symlink_swaps(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(rulefile, "WATCH_INTERVAL", 0.02)
    # the ConfigMap layout: rules.yaml -> ..data/rules.yaml, ..data -> a versioned folder
    for version, text in (("v1", GOOD), ("v2", OTHER), ("v3", "apis: [\n")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "rules.yaml").write_text(text)
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/rules.yaml", tmp_path / "rules.yaml")

    def swap(version):
        os.symlink(version, tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    rf = RuleFile()
    with taddons.context(rf) as tctx:
        tctx.configure(rf, gateway_rules=str(tmp_path / "rules.yaml"))
        rf.running()
        try:
            assert rf.rules.apis[0].name == "a"
            swap("v2")
            for _ in range(100):
                await asyncio.sleep(0.02)
                if rf.rules.apis[0].name == "b":
                    break
            assert rf.rules.apis[0].name == "b"
            with caplog.at_level(logging.ERROR):
                swap("v3")
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if "keeping the last good rules" in caplog.text:
                        break
            assert "keeping the last good rules" in caplog.text
            assert rf.rules.apis[0].name == "b"
        finally:
            rf.done()


def test_mistyped_option_is_warned_about(tmp_path, caplog):
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    rf = RuleFile()
    with taddons.context(rf) as tctx:
        tctx.configure(rf, gateway_rules=str(path))
        tctx.options.deferred["gateway_rule"] = "x"
        with caplog.at_level(logging.WARNING):
            rf._warn_unknown_options()
        assert "unknown option 'gateway_rule': did you mean 'gateway_rules'?" in caplog.text


async def test_watcher_reports_an_emptied_and_a_missing_file_and_keeps_the_rules(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(rulefile, "WATCH_INTERVAL", 0.02)
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    rf = RuleFile()

    async def until(text: str) -> None:
        for _ in range(200):
            if text in caplog.text:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{text!r} not logged: {caplog.text}")

    with taddons.context(rf) as tctx, caplog.at_level(logging.INFO):
        tctx.configure(rf, gateway_rules=str(path))
        rf.running()
        try:
            write(path, "# everything commented out\n")
            await until("the rule file is empty")
            assert rf.rules.apis[0].name == "a" and "keeping the last good rules" in caplog.text
            path.rename(tmp_path / "moved.yaml")
            await until(f"rule file {path} is missing (moved or deleted), keeping the last good rules")
            await asyncio.sleep(0.1)
            assert caplog.text.count("is missing") == 1  # reported once, not every tick
            assert rf.rules.apis[0].name == "a"
            write(path, OTHER)
            await until(f"rules reloaded from {path}")
            assert rf.rules.apis[0].name == "b"
        finally:
            rf.done()


def test_the_default_rule_file_is_the_repository_rules_yaml():
    """`mitmdump -s addons/gateway.py` without gateway_rules loads the rules.yaml beside addons/ (README)."""
    from pathlib import Path

    default = Path(rulefile.DEFAULT_RULES)
    assert default.is_file() and default == Path(__file__).resolve().parents[3] / "rules.yaml"
