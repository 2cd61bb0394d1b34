"""PerObject: one value per object, by identity, bounded (perobject.py)."""

from __future__ import annotations

from llm_gateway.util.perobject import PerObject


def test_built_once_per_object_by_identity_not_equality():
    built = []
    cache = PerObject(lambda obj, extra: built.append((obj, extra)) or len(built), limit=8)
    a, b = (1, 2), tuple([1, 2])  # equal, not the same object
    assert cache(a, "x") == cache(a, "y") == 1  # args are not part of the key
    assert cache(b, "x") == 2 and built == [(a, "x"), (b, "x")]


def test_bounded_and_never_confused_by_a_reused_id():
    cache = PerObject(lambda obj: obj[0], limit=3)
    keep = [(i,) for i in range(10)]
    for obj in keep:
        assert cache(obj) == obj[0]
        assert len(cache) <= 3
    cache.clear()
    assert len(cache) == 0
    # the entry holds its object, so a new object can never get an old object's id while that entry exists
    assert cache((42,)) == 42 and cache((43,)) == 43
