"""Weak links: sequential vs FIFO pipeline vs MoLink over slow links, against the bound.

One run measures, side by side on the same machine, model and workload (issue #8):

  (a) sequential     the same engine and continuous batching, exactly one micro-batch in
                     the pipeline at a time, first-in first-out sends (how llama.cpp's RPC
                     backend and Petals run)
  (b) FIFO pipeline  micro-batches = number of stages, first-in first-out sends, no chunking
                     (how vLLM's pipeline parallelism runs)
  (c) MoLink         everything on (measured micro-batching, decode-first link scheduling
                     with just-in-time prefill chunks), plus ablations that turn one
                     technique off at a time, and (c) with lossy int8 activations

Every system sends the model's own dtype (lossless) except the int8 row. The headline as
the project states it (tuned FIFO baseline, repeated runs, the mixed workload, the
cost-profit margin) is ``python -m benchmarks.weak_links.headline``; this grid covers more
settings with one run each.

in two regimes. *Emulated GPUs*: Qwen2.5-32B (or Llama-2-70B) on emulated RTX 3090 stages
(``molink join --emulate-device rtx3090``: a stage waits what the roofline profile predicts
instead of computing). *Real CPU*: a random Llama (hidden 1,024, 12 layers, float32), each
stage a ``molink join`` process with one thread. The head runs in this process without
layers (co-located with stage 1: that hop has no emulated link); every other link (stage
i -> i+1 and last stage -> head) goes through its own LinkEmulator relay process
(bandwidth + one-way latency), which also counts the bytes that cross it.

Workloads: *decode-heavy*: N requests at once (512 emulated, 256 CPU), 16-token prompts,
outputs that last past the measured window; measured once every request got its first
token. N is chosen so that the concurrency term of the bound does not bind: with 512
requests and a ~130 ms round trip it is ~4,000 tokens/s, above the 100 Mbit link's ~2,400
(at int8; ~1,200 lossless) and the stages' ~3,400, so the bound is set by the hardware, not by the client; on
CPU, 256 = two micro-batches of the most efficient batch (128) keep both cores busy.
*Mixed*: Poisson arrivals offering half of (b)'s capacity, ShareGPT-like log-normal lengths,
every tenth prompt long (1,000-2,000 tokens); the same requests at the same times for every
system of a setting.

The bound, printed per setting: every stage's capacity (tokens/s if it were never idle, at
the best batch size: from the device profile, or from single-thread step times measured in
this process before any run), every link's capacity (bandwidth / bytes per token that
actually crossed that relay in (c)'s decode-heavy window) and N / the shortest time for one
token to go round the pipeline. For CPU runs the stages share the machine's cores, so the
compute term is the machine's (cores x best tokens/s of all layers on one core). Each
system's fraction of the bound is printed next to it.

    python -m benchmarks.weak_links           # ~40 min; benchmarks/results/weak_links.md (+ PNGs)
    python -m benchmarks.weak_links --quick   # < 3 min: emulated 3 stages 100mbit:20ms ((a)
                                              # decode, (b) mixed, (c) both) + CPU (c) decode;
                                              # prints only; last line: one JSON object
    python -m benchmarks.weak_links --regime emulated --stages 3 --links 20mbit:50ms

Windows are short (8 s decode-heavy, 32 mixed requests; --quick: 6 s, 16 requests) so the
default grid fits in ~40 min on 2 cores (see ``--full-grid`` for what it leaves out); every
number comes from the run that prints it. Run from the repository root.

Modules: ``systems`` (what is compared, on which settings), ``regimes`` (models and stage
speeds), ``relay`` (the link-emulating relay processes), ``cluster`` (one pipeline of
head, stages and relays), ``workloads``, ``measurement``, ``bound``, ``grid`` (the runs),
``report``, ``plots``, ``__main__`` (options), ``headline`` (the headline protocol).
"""

