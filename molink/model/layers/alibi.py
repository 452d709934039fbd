"""ALiBi (attention with linear biases): per-head slopes for a linear distance penalty.

Instead of position embeddings, head ``h`` adds ``slope[h] * (key_pos - query_pos)`` to its
attention scores (BLOOM, Falcon-RW). Softmax is shift-invariant per query, so this equals
the ``slope[h] * key_pos`` that Hugging Face adds.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[num_heads] fp32 on CPU: the geometric slopes of the ALiBi paper.

    For a power-of-two head count n the slopes are ``2^(-8/n * i)``, i = 1..n. Otherwise the
    n' = largest power of two below n heads get those, and the rest take every other slope
    of the 2n' sequence (odd powers).
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    # Built on CPU explicitly: models are constructed inside a meta-device context.
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device="cpu")
    powers = torch.arange(1, 1 + closest, dtype=torch.int32, device="cpu")
    slopes = torch.pow(base, powers)
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))),
                                  dtype=torch.float32, device="cpu")
        num_extra = min(closest, num_heads - closest)
        extra_powers = torch.arange(1, 1 + 2 * num_extra, 2, dtype=torch.int32, device="cpu")
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)])
    return slopes
