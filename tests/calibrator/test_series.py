"""Redis key helpers of calibrator.series, against the real Redis."""

from __future__ import annotations

import pytest

from calibrator.series import SeriesKey, connect, delete_prefix


def test_delete_prefix_deletes_exactly_the_keys_under_a_literal_prefix(redis_client, prefix):
    glob_like = f"{prefix}a[1]*?:"  # SCAN glob characters, to be matched as themselves
    under = [f"{glob_like}{i}" for i in range(5)]
    # Not under it: the first two match the unescaped pattern "a[1]*?:*", the last differs in its final character.
    outside = [f"{prefix}a1x:k", f"{prefix}a1xy:", f"{prefix}a[1]*?x"]
    for key in under + outside:
        redis_client.set(key, b"v")
    assert delete_prefix(redis_client, glob_like, batch=2) == 5  # batches of 2: 3 UNLINKs
    assert redis_client.exists(*under) == 0
    assert redis_client.exists(*outside) == len(outside)
    assert delete_prefix(redis_client, glob_like) == 0


def test_delete_prefix_refuses_an_empty_prefix_before_touching_redis(closed_port_url):
    # A client of a port nothing listens on: were the refusal missing, this would fail with a connection error
    # instead of wiping a real database.
    with pytest.raises(ValueError, match="prefix is empty"):
        delete_prefix(connect(closed_port_url, timeout_s=0.5), "")


def test_decode_refuses_what_encode_cannot_produce():
    key = SeriesKey("org/model:v1", "t", "acme")
    assert SeriesKey.decode(key.encode().encode()) == key
    for bad in (b"not-a-key", b"a:b", b"a:b:c:d", b"::*", b"\xff:t:*"):
        with pytest.raises(ValueError, match="not an encoded series key"):
            SeriesKey.decode(bad)
