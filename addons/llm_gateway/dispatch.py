"""One mitmproxy addon in front of the gateway's concerns, so that each event is dispatched once.

mitmproxy delivers every event (and the `update` event that follows each flow event) by walking its
whole addon tree: a generator per addon, a `getattr` per addon and hook, a `safecall` per addon. With
twelve concerns as twelve addons that walk cost about 0.2 ms per request on a 2-core machine, more than
most concerns' own work (docs/benchmarks.md). `Dispatcher` is the only addon mitmproxy sees: for each
hook at least one concern implements, it holds the concerns' bound methods in the fixed order they were
given in, and calls them in a plain loop. Hooks no concern implements are not attributes at all, so
mitmproxy's `getattr` finds nothing and calls nothing.

What mitmproxy would have done for the concerns still happens:
- `load` goes to every concern (options declared there work as before), and their `@command.command`
  commands are registered with mitmproxy's command manager;
- `configure`, `running`, `done` and every flow, connection and TLS hook reach each concern in order;
  async hooks are awaited;
- an exception in one concern is logged as mitmproxy logs an addon error, and the next concern still
  runs; `OptionsError` (a refused option) and `AddonHalt` propagate as they do from an addon.

The dispatcher has no `addons` attribute: mitmproxy would then walk the concerns too and call every
hook twice. A concern keeps its hook names and signatures, its own module and its own tests.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mitmproxy import eventsequence, exceptions, hooks  # noqa: F401 - eventsequence registers every hook

logger = logging.getLogger("llm_gateway.dispatch")

# Raised by a concern to stop the event or to refuse an option: mitmproxy's safecall lets these through.
PASS_THROUGH = (exceptions.AddonHalt, exceptions.OptionsError)


def _name(concern: Any) -> str:
    return getattr(concern, "name", type(concern).__name__)


def _failed(hook: str, concern: Any, error: Exception) -> None:
    logger.error(f"Addon error in {_name(concern)}.{hook}: {error}", exc_info=error)


def _chain(hook: str, handlers: list[tuple[Any, Callable]]) -> Callable:
    """One callable for mitmproxy that calls every handler in order, each failure on its own."""
    if len(handlers) == 1:  # mitmproxy's own safecall isolates a single handler as well
        return handlers[0][1]
    calls = tuple(handlers)
    if any(inspect.iscoroutinefunction(fn) for _, fn in calls):

        async def dispatch_async(*args: Any) -> None:
            for concern, fn in calls:
                try:
                    result = fn(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
                except PASS_THROUGH:
                    raise
                except Exception as e:
                    _failed(hook, concern, e)

        return dispatch_async

    def dispatch(*args: Any) -> None:
        for concern, fn in calls:
            try:
                fn(*args)
            except PASS_THROUGH:
                raise
            except Exception as e:
                _failed(hook, concern, e)

    return dispatch


class Dispatcher:
    """The gateway as mitmproxy sees it: `Dispatcher([concern, …])`, in hook order."""

    def __init__(self, concerns: Sequence[Any]) -> None:
        self.concerns = tuple(concerns)
        self.hooks: dict[str, tuple[str, ...]] = {}  # hook -> the concerns that take it, in order (for humans)
        for hook in hooks.all_hooks:
            handlers = [(c, fn) for c in self.concerns if callable(fn := getattr(c, hook, None))]
            if hook == "load":
                continue  # below: it must also register the concerns' commands
            if handlers:
                setattr(self, hook, _chain(hook, handlers))
                self.hooks[hook] = tuple(_name(c) for c, _ in handlers)

    def load(self, loader) -> None:
        for concern in self.concerns:
            load = getattr(concern, "load", None)
            if callable(load):
                try:
                    load(loader)
                except PASS_THROUGH:
                    raise
                except Exception as e:
                    _failed("load", concern, e)
        for concern in self.concerns:  # what mitmproxy does for each addon it registers
            loader.master.commands.collect_commands(concern)

    def __repr__(self) -> str:
        return f"Dispatcher({', '.join(_name(c) for c in self.concerns)})"
