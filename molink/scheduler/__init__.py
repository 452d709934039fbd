"""The head's scheduler: requests, KV block ids, batching and preemption. Pure Python."""

from molink.scheduler.block_pool import BlockPool
from molink.scheduler.request import Request, RequestStatus
from molink.scheduler.scheduler import Scheduler

__all__ = ["BlockPool", "Request", "RequestStatus", "Scheduler"]
