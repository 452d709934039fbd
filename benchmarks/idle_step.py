"""A stage's decode step after it idled: what a pipeline stage pays that one process does not.

In a pipeline every stage waits for the others between its steps; one process computing
every layer steps back to back. This measures one executor (layers 4:8 of the benchmarks'
random Llama, the middle stage of ``benchmarks.token_trip``), one request decoding, one
thread, in this process: each step's compute time when steps follow back to back, and
after a pause of the length a stage waits in ``token_trip`` (about two other stages' steps)
spent sleeping, spinning in Python (the core stays busy and awake), or streaming through
an unrelated 64 MB buffer (what another process's weights do to the caches), the four
interleaved step by step. The bound: the back-to-back row.

    python -m benchmarks.idle_step [--pause-ms 25] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.peers.__main__ import model_dir
from benchmarks.peers.llama_cpp import DEFAULT_CACHE
from benchmarks.peers.report import lscpu

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXT = 128
SWEEP_MB = 64


def executor(directory: Path):
    from molink.config import CacheConfig, ModelConfig
    from molink.runtime.stage_executor import StageExecutor

    return StageExecutor(ModelConfig(str(directory), dtype="bfloat16", device="cpu",
                                     start_layer=4, end_layer=8),
                         CacheConfig(num_blocks=96), max_num_seqs=1)


class Decoder:
    """One request on one executor: a prompt, then one decode step per ``step()``."""

    def __init__(self, stage, steps: int) -> None:
        from molink.messages import BatchEntry, NewRequest, StepPlan
        from molink.sampling_params import SamplingParams

        self.stage, self.position, self.step_id = stage, CONTEXT, 1
        blocks = list(range(-(-(CONTEXT + steps) // stage.block_size)))
        prompt = NewRequest("r", list(range(1, CONTEXT + 1)), CONTEXT,
                            SamplingParams(temperature=0.0, max_tokens=steps + 1), blocks)
        stage.execute(StepPlan(0, [BatchEntry("r", 0, CONTEXT, True)], new_requests=[prompt]),
                      torch.zeros(CONTEXT, stage.loaded.arch.hidden_size, dtype=torch.bfloat16))

    def step(self) -> float:
        from molink.messages import BatchEntry, CachedRequest, StepPlan

        plan = StepPlan(self.step_id, [BatchEntry("r", self.position, 1, True)],
                        cached_requests=[CachedRequest("r", [5], [])])
        hidden = torch.zeros(1, self.stage.loaded.arch.hidden_size, dtype=torch.bfloat16)
        began = time.perf_counter()
        self.stage.execute(plan, hidden)
        self.position, self.step_id = self.position + 1, self.step_id + 1
        return time.perf_counter() - began


def pauses(pause_s: float) -> dict:
    sweep = torch.zeros(SWEEP_MB * 1024 * 1024 // 4)

    def spin() -> None:
        until = time.perf_counter() + pause_s
        while time.perf_counter() < until:
            pass

    return {"back to back": lambda: None,
            f"after {pause_s * 1e3:.0f} ms asleep": lambda: time.sleep(pause_s),
            f"after {pause_s * 1e3:.0f} ms spinning": spin,
            f"after a {SWEEP_MB} MB sweep": lambda: sweep.add_(1.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pause-ms", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per row")
    parser.add_argument("--out", type=Path, default=RESULTS / "idle_step.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    directory = model_dir(SimpleNamespace(hidden=1024, layers=12, vocab=8000,
                                          cache_dir=DEFAULT_CACHE))
    modes = pauses(args.pause_ms / 1e3)
    decoder = Decoder(executor(directory), steps=(args.steps + 5) * len(modes))
    print(f"measuring {len(modes)} x {args.steps} decode steps, interleaved (~"
          f"{(args.steps + 5) * len(modes) * (0.012 + args.pause_ms / 2e3):.0f} s)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(args.steps + 5):  # interleaved: every row sees the same context lengths
        for name, before in modes.items():
            before()
            seconds = decoder.step()
            if i >= 5:
                times[name].append(seconds)
    rows = [(name, statistics.median(values)) for name, values in times.items()]
    for name, seconds in rows:
        print(f"{name:28s} {seconds * 1e3:6.2f} ms", flush=True)
    base = rows[0][1]
    command = "python -m benchmarks.idle_step " + " ".join(sys.argv[1:] if argv is None
                                                            else argv)
    lines = ["# A stage's decode step after it idled", "",
             f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", (f"One executor of layers 4:8 of the benchmarks' random Llama (hidden 1024, "
                  f"GQA 16/4, bf16 weights packed for this CPU), one request decoding at "
                  f"{CONTEXT}+ tokens of context, one thread, {args.steps} steps per row, "
                  f"the rows interleaved step by step (medians, after 5 unmeasured rounds). "
                  f"The bound: back to back."), "",
             "| before each step | decode step (ms) | x back to back |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} |"
              for name, seconds in rows]
    lines += ["", "Machine:", "", "```", lscpu().strip(), "```", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
