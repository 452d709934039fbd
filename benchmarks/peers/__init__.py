"""Peers: MoLink against llama.cpp RPC on the same model, links, client, side by side.

One run (issue 18, point 4) builds llama.cpp from the tree vendored in the
``llama-cpp-python`` sdist (``-DGGML_RPC=ON``, no web UI, CPU only; cached outside the
repository), converts the benchmarks' random Llama (hidden 1,024, 12 layers, GQA 16/4, vocab
8,000, 151M parameters) to GGUF with that tree's ``convert_hf_to_gguf.py``, and runs on it:

  llama.cpp RPC  ``llama-server`` (layers 0:4, the output layer) + two ``rpc-server``
                 processes (layers 4:8 and 8:12), each rpc-server behind its own relay
  MoLink         ``molink serve --layers 0:4`` + ``molink join --layers 4:8`` + ``molink join
                 --layers 8:12``; every hop (head -> 2, 2 -> 3, 3 -> head) through a relay

Every relay is the same LinkEmulator process (``benchmarks.weak_links.relay``), one per node
that receives data, at 1gbit:1ms, 100mbit:20ms and 20mbit:50ms. Every node computes with one
thread. One streaming client (OpenAI ``/v1/completions``, ``stream: true``, prompts of 128
random token ids, 128 output tokens, ``ignore_eos``, greedy) measures both: one request at a
time, then 16 at once. Weight precision is paired: llama.cpp f16 against MoLink bfloat16,
llama.cpp Q8_0 against MoLink int8. Not in CI: ``python -m benchmarks.peers [--quick]``.
"""
