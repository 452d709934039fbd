"""Placement: which contiguous layer range each stage of a pipeline serves. Pure Python.

Today the split is even (every stage the same number of layers, give or take one); a
placement from measured stage speeds (issue 15) belongs here too.
"""

from __future__ import annotations


def split_layers(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """``num_stages`` contiguous half-open ranges tiling ``[0, num_layers)``.

    Every range has ``num_layers // num_stages`` layers; the ``num_layers % num_stages``
    layers left over go one each to the first stages. So sizes differ by at most one, and
    the last stage, which also projects onto the vocabulary and samples, never carries an
    extra layer::

        4 layers, 3 stages:   (0, 2) (2, 3) (3, 4)
        64 layers, 3 stages:  (0, 22) (22, 43) (43, 64)
    """
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"num_stages must be between 1 and num_layers ({num_layers}), "
                         f"got {num_stages}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for i in range(num_stages):
        end = start + base + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges
