"""The one smoothing rule for measured quantities (step times, link bandwidth and latency).

Every measurement that feeds a decision (micro-batch count, wire compression, link pacing)
is an exponentially weighted moving average with the same weight: a new sample moves the
estimate a fifth of the way, so one outlier (a GC pause, a retransmit) shifts it by 20 %
while a real change is followed within about ten samples.
"""

EWMA_WEIGHT = 0.2


def ewma(current: float, sample: float) -> float:
    """``current`` moved ``EWMA_WEIGHT`` of the way towards ``sample``."""
    return current + EWMA_WEIGHT * (sample - current)
