"""MoLink: serve one large language model across several consumer GPUs over ordinary links.

``from molink import LLM, SamplingParams`` mirrors vLLM's offline API. ``LLM`` is imported
lazily so that torch-free parts (the scheduler, the messages) can be used without torch.
"""

from molink.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from molink.entrypoints.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from molink import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'molink' has no attribute {name!r}")
