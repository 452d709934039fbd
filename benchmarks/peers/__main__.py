"""``python -m benchmarks.peers``: build llama.cpp, convert the model, run, write the page."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import peers
from benchmarks.peers.clusters import LlamaCppRpc, MolinkPipeline, Setup, rpc_split
from benchmarks.peers.llama_cpp import DEFAULT_CACHE, LlamaCpp, gguf_file, log, prepare
from benchmarks.peers.report import write_report
from benchmarks.peers.run import Precision, Workload, run_all
from molink.transport.link_emulator import LinkSpec

RESULTS = Path(__file__).resolve().parents[1] / "results"
LINKS = ["1gbit:1ms", "100mbit:20ms", "20mbit:50ms"]
PRECISIONS = {
    "16bit": Precision("16bit", "f16", ("--dtype", "bfloat16"), "f16 GGUF",
                       "bfloat16 (HF checkpoint)"),
    "8bit": Precision("8bit", "q8_0", ("--dtype", "bfloat16", "--quantization", "int8"),
                      "Q8_0 GGUF", "int8 (bfloat16 activations)"),
}
SYSTEMS = [LlamaCppRpc.label, MolinkPipeline.label]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                                     description=peers.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="100mbit:20ms, 16-bit only, 1 single request, 32 output tokens; "
                             "writes --out only if given (default: off)")
    parser.add_argument("--links", nargs="+", default=None,
                        help=f"link regimes, bandwidth:latency (default: {' '.join(LINKS)})")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=None,
                        help="weight precisions (default: 16bit 8bit)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS,
                        help="default: both")
    parser.add_argument("--concurrency", type=int, default=16, help="default: 16")
    parser.add_argument("--single-requests", type=int, default=None,
                        help="requests one at a time (default: 3; --quick 1)")
    parser.add_argument("--prompt-len", type=int, default=128, help="default: 128")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="output tokens (default: 128; --quick 32)")
    parser.add_argument("--threads", type=int, default=1, help="threads per node (default: 1)")
    parser.add_argument("--llama-output", choices=["last", "head"], default="head",
                        help="llama.cpp's output layer: on llama-server (-ot ^output=CPU: "
                             "only hidden states cross the links), or on the last rpc-server "
                             "as MoLink's last stage has it (logits cross the link back) "
                             "(default: head)")
    parser.add_argument("--hidden", type=int, default=1024, help="default: 1024")
    parser.add_argument("--layers", type=int, default=12, help="default: 12")
    parser.add_argument("--vocab", type=int, default=8000, help="default: 8000")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"llama.cpp sdist, build and GGUF files (default: {DEFAULT_CACHE})")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build llama.cpp and convert the model, then stop (default: off)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results page (default: benchmarks/results/peers.md; --quick: "
                             "none)")
    args = parser.parse_args(argv)
    args.links = args.links or (["100mbit:20ms"] if args.quick else LINKS)
    args.precisions = args.precisions or (["16bit"] if args.quick else list(PRECISIONS))
    args.single_requests = args.single_requests or (1 if args.quick else 3)
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    if args.out is None and not args.quick:
        args.out = RESULTS / "peers.md"
    for link in args.links:
        try:
            LinkSpec.parse(link)
        except ValueError as exc:
            parser.error(f"--links: {exc}")
    if args.layers % 3:
        parser.error("--layers must split into three equal thirds (0:n/3, n/3:2n/3, 2n/3:n)")
    return args


def model_dir(args) -> Path:
    """The benchmarks' random Llama (seed 0), cached next to the GGUF files."""
    from benchmarks.random_llama import build_model

    directory = args.cache_dir.parent / "models" / (
        f"random-llama-h{args.hidden}-l{args.layers}-v{args.vocab}")
    if not (directory / "complete").exists():
        log(f"building the random Llama in {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        build_model(directory, args.hidden, args.layers, args.vocab)
        (directory / "complete").write_text("ok")
    return directory


def sixteen_bit_line() -> str:
    """How MoLink multiplies 16-bit weights on this CPU (it differs with native bf16)."""
    from molink.model.loader import cpu_lacks_native_bf16

    if cpu_lacks_native_bf16():
        return ("On this CPU (no native bfloat16) MoLink keeps 16-bit weights and multiplies "
                "up to 32 rows in its own fused kernel, the weights widened in registers "
                "against float32 activations (molink/model/layers/fused16.py), as llama.cpp "
                "does with f16, a decode step's layers in one call to its kernels "
                "(molink/model/layers/decode_layers.c); more rows widen the weight to float32 "
                "(molink/model/layers/cpu_linear.py).")
    from molink.model.layers import packed_linear

    packing = ("in AMX tiles for its own AMX kernel (molink/model/layers/int_amx.c)"
               if packed_linear.amx_kernel() is not None else "in oneDNN's layout")
    return ("On this CPU (native bfloat16: AVX512-BF16 or AMX) MoLink multiplies bf16 "
            f"weights packed once at load (molink/model/layers/packed_linear.py) {packing}, "
            "and a decode step attends over its KV cache in place "
            "(molink/model/layers/gemm16.c), all of a stage's layers in one call to those "
            "kernels (molink/model/layers/decode_layers.c); llama.cpp multiplies f16 weights "
            "in its own CPU kernels.")


def setup_lines(args, setup: Setup, ggufs: dict[str, Path]) -> list[str]:
    precisions = [PRECISIONS[p] for p in args.precisions]
    version = setup.llama.version if setup.llama else "-"
    split = rpc_split(args.layers)
    output = (", output layer on B: llama-server fetches the logits" if args.llama_output
              == "last" else ", output layer kept on llama-server by `-ot ^output=CPU`")
    return [
        f"Model: the benchmarks' random Llama (`benchmarks/random_llama.py build_model(dir, "
        f"{args.hidden}, {args.layers}, {args.vocab})`: GQA 16/4, 151M parameters at the "
        "defaults). llama.cpp serves it converted by its own `convert_hf_to_gguf.py` ("
        + ", ".join(f"`{p.name}`" for p in ggufs.values()) + f") from {version}; "
        "MoLink serves the Hugging Face checkpoint.",
        "",
        "Weights, paired by precision: " + "; ".join(
            f"llama.cpp {p.llama_label} vs MoLink {p.molink_label}" for p in precisions)
        + ". " + sixteen_bit_line() + " MoLink int8 keeps per-channel int8 weights "
        "(`--quantization int8`, quantized at load) as Q8_0 keeps 8-bit weights with "
        "per-32 scales.",
        "",
        (f"Nodes: 3 processes on this machine, {args.threads} thread(s) each "
        f"(MoLink: OMP_NUM_THREADS={args.threads}; llama.cpp: `-t {args.threads} -tb "
        f"{args.threads}` on llama-server and `-t {args.threads}` on each rpc-server). "
        f"Layers in thirds: llama-server 0:4, rpc-server A 4:8, B 8:12 (`{' '.join(split)}`"
        f"{output}; the split llama-server logged is below); MoLink head 0:4, stages 4:8 and "
        "8:12 (the last stage computes the output layer and samples). llama-server: "
        f"`-np {setup.max_num_seqs} -cb -c {setup.max_num_seqs * setup.max_model_len} -fit off "
        f"-cram 0`; MoLink: `--max-num-seqs {setup.max_num_seqs}`, default scheduling, "
        "micro-batching and compression, default peer security."),
        "",
        ("Links: one `benchmarks.weak_links.relay` process (the LinkEmulator: bandwidth "
        "serialisation + one-way latency, per direction) in front of every node that receives "
        "data: each rpc-server (llama.cpp), and stage 2, stage 3 and the head's result port "
        "(MoLink). The client reaches each head directly."),
    ]


def prepare_inputs(args) -> tuple[Path, LlamaCpp | None, dict[str, Path]]:
    """The checkpoint; llama.cpp's binaries and GGUF files when llama.cpp runs."""
    model = model_dir(args)
    if LlamaCppRpc.label not in args.systems:
        return model, None, {}
    llama = prepare(args.cache_dir)
    return model, llama, {PRECISIONS[p].gguf_type: gguf_file(
        llama, model, PRECISIONS[p].gguf_type, args.cache_dir) for p in args.precisions}


async def run_benchmark(setup: Setup, args, ggufs: dict[str, Path], on_row):
    # SIGTERM (``timeout``, a CI runner) as Ctrl-C: cancel, so that every finally stops its
    # processes, instead of dying with them still running
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    log(f"server logs under {setup.log_dir}")
    return await run_all(setup, args.links, [PRECISIONS[p] for p in args.precisions],
                         args.systems, workload_of(args), ggufs, args.layers, on_row)


def workload_of(args) -> Workload:
    return Workload(args.prompt_len, args.max_tokens, args.single_requests, args.concurrency)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv)
    num_clusters = len(args.precisions) * len(args.systems) * (1 + len(args.links))
    try:
        model, llama, ggufs = prepare_inputs(args)
        if args.prepare_only:
            return 0
        setup = Setup(model, llama, args.threads, args.concurrency,
                      args.prompt_len + args.max_tokens + 64,
                      Path(tempfile.mkdtemp(prefix="molink-peers-")), args.llama_output)

        def write(bounds, rows) -> str:
            """The page so far (a run cut short leaves its finished clusters)."""
            missing = num_clusters - len(bounds) - len(rows)
            report = write_report(command.strip(), setup_lines(args, setup, ggufs),
                                  workload_of(args), bounds, rows,
                                  time.perf_counter() - started, missing)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(report)
            return report

        bounds, rows = asyncio.run(run_benchmark(setup, args, ggufs, write))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"interrupted; every process started was stopped; {args.out or 'no page'} has "
              "the clusters finished so far", file=sys.stderr)
        return 130
    report = write(bounds, rows)
    print("\n" + report.split("## Bound", 1)[0], flush=True)
    if args.out is not None:
        log(f"wrote {args.out}")
    return 0 if not any(r.error for r in bounds + rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
