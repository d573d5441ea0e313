"""Helpers of weavelet_core.transport that every transport's batched reads share."""

from __future__ import annotations

import gc

import pytest

from weavelet_core.transport import decoding_many


def test_decoding_many_pauses_the_collector_and_always_restores_it() -> None:
    assert gc.isenabled()
    with decoding_many():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), decoding_many():
        raise ValueError("a decode failed")
    assert gc.isenabled()


def test_decoding_many_leaves_a_disabled_collector_disabled() -> None:
    gc.disable()
    try:
        with decoding_many():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
