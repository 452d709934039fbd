"""Frontend: the one front half of every engine (the in-process ``LLMEngine`` and the
pipeline head's ``HeadLoop``).

Both need the same facts about their model before a request can run, worked out the same
way so the same model directory answers the same everywhere:

* the tokenizer (``tokenizer.load_tokenizer``, never remote code);
* the end-of-sequence ids (``tokenizer.eos_token_ids``: config.json + generation_config.json
  + the tokenizer, deduplicated);
* the model length ``max_model_len``: as configured, else the model's
  ``max_position_embeddings``; never more than the KV cache can hold (clamped with a warning,
  since the user asked for more than they get) and at least 2 (a prompt token and one more).

It then turns prompts into validated ``Request`` objects (``prompts.make_request``).
"""

from __future__ import annotations

import logging

from molink.config import ModelConfig
from molink.coordinator.prompts import make_request
from molink.coordinator.tokenizer import eos_token_ids, load_tokenizer
from molink.sampling_params import SamplingParams
from molink.scheduler import Request

logger = logging.getLogger(__name__)


class Frontend:
    def __init__(self, model_config: ModelConfig, arch) -> None:
        """``arch``: the model's normalised config (vocabulary, positions, config.json EOS)."""
        self.tokenizer = load_tokenizer(model_config.tokenizer or model_config.model)
        self.eos_token_ids = eos_token_ids(self.tokenizer, arch.eos_token_ids,
                                           model_config.model)
        self.vocab_size = arch.vocab_size
        self._wanted_max_len = model_config.max_model_len or arch.max_position_embeddings
        self.max_model_len = 0  # 0 until the KV capacity is known (``fit_kv_capacity``)

    def fit_kv_capacity(self, kv_capacity_tokens: int) -> int:
        """Set and return ``max_model_len`` for a KV cache of ``kv_capacity_tokens``."""
        if self._wanted_max_len > kv_capacity_tokens:
            logger.warning("max_model_len %d exceeds the KV cache capacity; using %d tokens",
                           self._wanted_max_len, kv_capacity_tokens)
        self.max_model_len = max(2, min(self._wanted_max_len, kv_capacity_tokens))
        return self.max_model_len

    def make_request(self, request_id: str, prompt,
                     params: SamplingParams) -> tuple[str | None, Request]:
        """Tokenize and validate ``prompt`` (ValueError naming the field if it is bad);
        -> (prompt text or None, a new Request carrying this model's EOS ids)."""
        return make_request(request_id, prompt, params, tokenizer=self.tokenizer,
                            vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                            eos_token_ids=self.eos_token_ids)
