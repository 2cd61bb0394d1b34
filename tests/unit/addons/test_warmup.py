"""Warm-up: the price list loaded and start-up objects frozen when the gateway starts (warmup.py)."""

from __future__ import annotations

import gc

from llm_gateway.policy import pricing
from llm_gateway.addons.warmup import Warmup


def test_running_loads_the_price_list_and_freezes_what_start_up_left(monkeypatch):
    loaded = []
    monkeypatch.setattr(pricing, "preload", lambda: loaded.append(True))
    before = gc.get_freeze_count()
    try:
        Warmup().running()
        assert loaded == [True]
        assert gc.get_freeze_count() > before  # the objects alive now are left out of every later collection
    finally:
        gc.unfreeze()


def test_a_price_list_that_fails_to_load_does_not_stop_the_start(monkeypatch, caplog):
    def broken():
        raise OSError("snapshot unreadable")

    monkeypatch.setattr(pricing, "preload", broken)
    try:
        Warmup().running()
    finally:
        gc.unfreeze()
    assert "price list" in caplog.text


def test_preload_reads_the_snapshot_so_the_first_request_does_not():
    pricing.library_model.cache_clear()
    pricing.preload()
    assert pricing.library_model.cache_info().currsize >= 1
    assert pricing.cost((), "claude-sonnet-4-5", {"input_tokens": 1000}).source == pricing.LIBRARY
