"""MLPs: gated (SwiGLU and friends), down(act(gate(x)) * up(x)); and plain, down(act(up(x)))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.layers.cpu_linear import HALF_DTYPES
from molink.model.layers.stage_model import register_as

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"hidden_act {name!r} is not supported (supported: {', '.join(_ACTIVATIONS)})"
        ) from None


class GatedMLP(nn.Module):
    """``names``: the checkpoint's names of the fused gate|up projection and the down one
    (ChatGLM: ``dense_h_to_4h``, ``dense_4h_to_h``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False,
                 names: tuple[str, str] = ("gate_up_proj", "down_proj")) -> None:
        super().__init__()
        # gate and up in one matmul (Llama: filled from the checkpoint's gate_proj and up_proj).
        register_as(self, names[0], "_gate_up",
                    nn.Linear(hidden_size, 2 * intermediate_size, bias=bias))
        register_as(self, names[1], "_down", nn.Linear(intermediate_size, hidden_size, bias=bias))
        self.act = get_activation(act)

    # fused16's kernels where silu(gate) * up runs through them (decoder.use_cpu_operators)
    kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._gate_up(x)  # x: [T, hidden] -> [T, 2 * inter]
        if (self.kernel is not None and self.act is F.silu and gate_up.dim() == 2
                and gate_up.dtype in HALF_DTYPES and gate_up.is_contiguous()
                and gate_up.shape[1] % 16 == 0):
            return self._down(self.kernel.silu_mul(gate_up))  # same roundings, one call
        gate, up = gate_up.chunk(2, dim=-1)  # 2 x [T, inter]
        return self._down(self.act(gate) * up)


class DenseMLP(nn.Module):
    """down(act(up(x))), no gate, under the checkpoint's names for the two projections
    (GPT-2 ``c_fc``/``c_proj``, BLOOM and Falcon ``dense_h_to_4h``/``dense_4h_to_h``, Phi
    ``fc1``/``fc2``). ``linear(in, out, bias=...)`` builds each projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str,
                 names: tuple[str, str], bias: bool = True, linear=nn.Linear) -> None:
        super().__init__()
        register_as(self, names[0], "_up", linear(hidden_size, intermediate_size, bias=bias))
        register_as(self, names[1], "_down", linear(intermediate_size, hidden_size, bias=bias))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._down(self.act(self._up(x)))
