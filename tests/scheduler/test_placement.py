"""The even layer split tiles the model with ranges that differ by at most one layer."""

from __future__ import annotations

import itertools

import pytest

from molink.scheduler.placement import split_layers


def test_known_splits():
    assert split_layers(6, 3) == [(0, 2), (2, 4), (4, 6)]  # the bundled model in `molink demo`
    assert split_layers(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert split_layers(64, 3) == [(0, 22), (22, 43), (43, 64)]  # benchmarks/results/weak_links.md
    assert split_layers(7, 1) == [(0, 7)]


@pytest.mark.parametrize("num_layers", range(1, 41))
def test_every_split_tiles_the_model_evenly(num_layers):
    for num_stages in range(1, num_layers + 1):
        ranges = split_layers(num_layers, num_stages)
        assert len(ranges) == num_stages
        assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous
        sizes = [end - start for start, end in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the last stage never has more


@pytest.mark.parametrize("num_stages", [0, 5])
def test_impossible_splits_are_refused(num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        split_layers(4, num_stages)
