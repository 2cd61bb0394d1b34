"""The rule file as a mitmproxy addon: the `gateway_rules` option, loading, watching and reloading.

The current `Rules` is replaced whole, only by a version that parsed cleanly: a broken edit is
reported and the last good rules stay in force; so is an emptied file (policy/rules.py refuses it) and a file
that was moved away or deleted (reported once, read again when it is back). At start-up a broken file is
an error, which makes mitmdump exit non-zero with the file, line and reason.

A file edited in place can be caught half-written, and a YAML prefix is usually valid YAML: cut at the wrong
line, key custody is off. So the watcher reads a file changed in place only once it has stayed the same for one
watch interval; a swapped file (another inode: an editor's rename, a Kubernetes ConfigMap's symlink swap) is
whole and is read at once, as before. And a
reload that turns key custody off, or leaves the upstream keys without tokens (any caller gets the real key),
while the rules in force had it on, is refused unless the new file says `allow_custody_off: true`.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
from pathlib import Path

from mitmproxy import command, ctx, exceptions

from llm_gateway.mitm import options
from llm_gateway.policy import rules as rules_mod
from llm_gateway.policy.rules import Rules, RulesError
from llm_gateway.util.files import file_stamp

logger = logging.getLogger("llm_gateway.rules")

# the repository's rules.yaml: addons/llm_gateway/addons/rulefile.py -> the folder holding addons/
DEFAULT_RULES = str(Path(__file__).resolve().parents[3] / "rules.yaml")
WATCH_INTERVAL = 0.5  # seconds; a changed file is live within about a second


def refuse_repeated_options() -> None:
    """mitmproxy drops a script option given twice with --set when the script registers, and says
    nothing: the gateway would run without its rules. Make that a start-up error instead."""
    for name, values in options.repeated_options("gateway_").items():
        logger.error(f"option {name} is set {len(values)} times ({values}): give it once")


def custody(rules: Rules) -> str:
    """How the rules keep the upstream key: "tokens" (callers need a gateway token), "open" (key custody with no
    tokens: any caller gets the key sent), or "off" (no `credentials`: callers' own credentials pass)."""
    if rules.credentials is None:
        return "off"
    return "tokens" if rules.credentials.tokens else "open"


def refuse_custody_off(current: Rules, new: Rules, path: str) -> None:
    """A reload must not weaken key custody by accident (a file cut short, a section deleted): RulesError unless
    the new file says `allow_custody_off: true`."""
    before, after = custody(current), custody(new)
    weaker = (before == "tokens" and after != "tokens") or (before == "open" and after == "off")
    if weaker and not new.allow_custody_off:
        what = "turns key custody off" if after == "off" else "leaves the upstream keys without gateway tokens"
        raise RulesError(f"{path}:1: this version {what} while the rules in force have it on; refusing it "
                         "(set `allow_custody_off: true` in the file to do that on purpose)")


class RuleFile:
    def __init__(self) -> None:
        self.rules = Rules()
        self.path: str | None = None
        self.loaded = False
        self._stamp: tuple | None = None
        self._missing = False  # the watched file is gone; reported once
        self._seen: tuple | None = None  # a changed stamp waiting to stay the same for one interval
        self._watcher: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "gateway_rules",
            str,
            DEFAULT_RULES,
            "Path of the gateway's rule file (API hosts, routes, client signatures, egress policy, usage log).",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        path = os.path.expanduser(ctx.options.gateway_rules)
        try:
            self._install(path)
        except RulesError as e:
            if self.loaded:  # a running gateway refuses the change and keeps its rules
                raise exceptions.OptionsError(str(e)) from None
            logger.error(f"refusing rule file: {e}")

    def running(self) -> None:
        self._warn_unknown_options()
        if not self.loaded:  # e.g. gateway_rules given twice, which mitmproxy drops without a word
            logger.error(f"no rule file loaded (gateway_rules={ctx.options.gateway_rules!r}): refusing to run without rules")
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _warn_unknown_options(self) -> None:
        """mitmproxy silently defers `--set` options nobody declared: a typo would go unnoticed."""
        known = [k for k in ctx.options.keys() if k.startswith("gateway")]
        for key in options.unknown_options("gateway"):
            hint = difflib.get_close_matches(key, known, n=1)
            logger.warning(f"unknown option {key!r}" + (f": did you mean {hint[0]!r}?" if hint else ""))

    def done(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            self._watcher = None

    @command.command("gateway.reload")
    def reload(self) -> None:
        """Reload the gateway's rule file now (the last good rules stay if it is broken)."""
        if self.path is None:
            return
        try:
            self._install(self.path)
        except RulesError as e:
            logger.error(f"rule file not reloaded, keeping the last good rules: {e}")

    def _install(self, path: str) -> None:
        stamp = file_stamp(path)
        new = rules_mod.load(path)
        if self.loaded:
            refuse_custody_off(self.rules, new, path)
        changed = self.loaded
        self.rules, self.path, self._stamp, self.loaded = new, path, stamp, True
        if changed:
            logger.info(f"rules reloaded from {path}")
        else:
            logger.info(f"rules loaded from {path}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if self.path is None:
                continue
            stamp = file_stamp(self.path)
            if stamp is None:
                if not self._missing:
                    self._missing = True
                    logger.error(f"rule file {self.path} is missing (moved or deleted), keeping the last good "
                                 f"rules; it is read again when it is back")
                continue
            self._missing = False
            if stamp == self._stamp:
                self._seen = None
                continue
            swapped = self._stamp is None or stamp[:3] != self._stamp[:3]  # another file (path, device, inode)
            if not swapped and stamp != self._seen:  # changed in place since the last look: maybe still being
                self._seen = stamp  # written; read once it stayed the same for an interval
                continue
            self._stamp, self._seen = stamp, None  # report a broken version once, not every tick
            try:
                self._install(self.path)
            except RulesError as e:
                logger.error(f"rule file changed but is broken, keeping the last good rules: {e}")
            except Exception:  # the watcher must outlive anything a file can do to it
                logger.exception("rule file watcher")
