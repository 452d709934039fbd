"""ConfigView: a ``transformers`` config seen with some attributes supplied or replaced.

``ArchConfig.from_hf`` reads Llama-style attribute names. Families that name a quantity
differently (GPT-2's ``n_inner``, Falcon's ``ffn_hidden_size``) or leave it implicit
(BLOOM's 4x MLP) pass a view that supplies the Llama name, without copying or mutating the
config object.
"""

from __future__ import annotations

from typing import Any


class ConfigView:
    def __init__(self, hf_config, **values: Any) -> None:
        self._hf_config = hf_config
        self._values = values

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the view itself.
        values = self.__dict__["_values"]
        if name in values:
            return values[name]
        return getattr(self.__dict__["_hf_config"], name)
