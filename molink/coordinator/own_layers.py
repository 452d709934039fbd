"""OwnLayers: the head's own layers under automatic placement (``serve --layers auto``).

The head offers its memory and measured speed like any stage (``runtime/node_budget.py``),
as the first node (it holds the embeddings), asks every second until the plan gives it a
range or leaves it out, then loads that range (a Hub model: its shards only) with the KV
cache its memory has left, and hands it to the engine loop before the route opens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from molink.config import CacheConfig, ModelConfig
from molink.coordinator.auto_placement import HEAD
from molink.coordinator.head_config import HeadConfig
from molink.runtime.intra_op import in_own_thread
from molink.runtime.node_budget import NodeOffer, kv_budget_within, measure_offer
from molink.runtime.stage_executor import StageExecutor, resolve_device

logger = logging.getLogger(__name__)

OFFER_INTERVAL_S = 1.0


class OwnLayers:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, max_num_seqs: int,
                 config: HeadConfig) -> None:
        self.model_config, self.cache_config = model_config, cache_config
        self.max_num_seqs, self.config = max_num_seqs, config

    def measure(self) -> NodeOffer:
        device = resolve_device(self.model_config.device)
        return measure_offer(self.model_config.model, self.model_config.dtype, device,
                             self.config.max_memory, self.config.gpu_memory_utilization)

    def load(self, layers: tuple[int, int], offer: NodeOffer, weight_bytes: int) -> StageExecutor:
        start, end = layers
        model = self.model_config.model
        if self.config.fetch_layers is not None:  # a Hub model: this range's shards
            model = self.config.fetch_layers(start, end)
        cache_config = self.cache_config
        if cache_config.num_blocks is None and self.config.max_memory is not None:
            budget = kv_budget_within(offer.memory_bytes, weight_bytes, "--max-memory")
            cache_config = dataclasses.replace(cache_config, kv_cache_memory_bytes=budget)
        model_config = self.model_config.replace(model=model, start_layer=start, end_layer=end)
        return StageExecutor(model_config, cache_config, max_num_seqs=self.max_num_seqs)

    async def take(self, desk, loop, stopping: Callable[[], bool]) -> tuple[int, int] | None:
        """Offer, wait for the plan, load: the head's range, or None (no layers for it)."""
        offer = await in_own_thread(self.measure)
        layers = None
        while not stopping():
            try:
                layers = await desk.place(HEAD, offer.memory_bytes, offer.seconds_per_layer)
            except ValueError as exc:  # the model's sizes cannot be worked out for a plan
                logger.error("automatic placement is not possible: %s; give --layers", exc)
                return None
            if layers is not None or HEAD not in desk.placement.offers:
                break
            await asyncio.sleep(OFFER_INTERVAL_S)
        if layers is None or stopping():
            return None
        try:
            weight_bytes = desk.placement.footprint.weight_bytes(*layers)
            executor = await in_own_thread(self.load, layers, offer, weight_bytes)
        except (ValueError, RuntimeError, OSError) as exc:
            logger.error("the head could not load layers %d:%d: %s", *layers, exc)
            return None
        finally:
            desk.placement.joined(HEAD, *layers)
        loop.attach_executor(executor)
        logger.info("the head serves layers %d:%d", *layers)
        return layers
