"""llama.cpp, built once: the sdist's vendored tree, its RPC binaries, the model as GGUF.

Everything lives in a cache directory outside the repository (``~/.cache/molink-bench/
llama.cpp`` by default) and is skipped when already there: the download, the unpacked tree,
the build (``llama-server``, ``ggml-rpc-server``; ~6 minutes on 2 cores, run under ``nice
-n 19 -j2``) and each GGUF file.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path.home() / ".cache" / "molink-bench" / "llama.cpp"
TARGETS = ("llama-server", "ggml-rpc-server")
# RPC on; the web UI neither built (npm) nor downloaded; no tests, examples or HTTPS; static
# binaries; the CPU backend compiled for this machine (-march=native, its default).
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class LlamaCpp:
    source: Path  # the vendored llama.cpp tree
    build: Path
    version: str  # the sdist's, e.g. llama_cpp_python-0.3.36

    @property
    def server(self) -> Path:
        return self.build / "bin" / "llama-server"

    @property
    def rpc_server(self) -> Path:
        return self.build / "bin" / "ggml-rpc-server"


def prepare(cache: Path) -> LlamaCpp:
    """Download, unpack and build, each step only if its result is missing."""
    cache.mkdir(parents=True, exist_ok=True)
    sdist = _download(cache)
    version = sdist.name.removesuffix(".tar.gz")
    tree = cache / version
    if not (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        log(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as archive:
            archive.extractall(cache, filter="data")
    llama = LlamaCpp(tree / "vendor" / "llama.cpp", cache / "build", version)
    # one build at a time in a cache directory: a second run waits, then finds the binaries
    with (cache / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if llama.server.exists() and llama.rpc_server.exists():
            log(f"llama.cpp binaries found in {llama.build / 'bin'}")
        else:
            _build(llama)
    return llama


def _download(cache: Path) -> Path:
    found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    log(f"downloading the llama-cpp-python sdist into {cache} (pip download --no-binary)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                    "--no-deps", "llama-cpp-python", "-d", str(cache)], check=True)
    found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {cache}")
    return found[-1]


def _build(llama: LlamaCpp) -> None:
    nice = ["nice", "-n", "19"]
    log(f"cmake: configuring {llama.source} into {llama.build}")
    _run([*nice, "cmake", "-S", str(llama.source), "-B", str(llama.build), *CMAKE_OPTIONS],
         llama.build.parent / "cmake.log")
    log(f"cmake: building {', '.join(TARGETS)} with -j2 (about 6 minutes on 2 idle cores, "
        f"more on a busy machine; progress in {llama.build.parent / 'make.log'})")
    _run([*nice, "cmake", "--build", str(llama.build), "-j2", "--target", *TARGETS],
         llama.build.parent / "make.log")
    log("llama.cpp built")


def _run(command: list[str], log_path: Path) -> None:
    with log_path.open("w") as out:
        done = subprocess.run(command, check=False, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command[:6])} ... failed (exit {done.returncode}); "
                           f"{log_path}:\n{tail}")


def gguf_file(llama: LlamaCpp, model_dir: Path, outtype: str, cache: Path) -> Path:
    """``model_dir`` as GGUF with ``outtype`` (f16, q8_0), converted by llama.cpp's own
    converter (see ``gguf_convert``); cached by model directory name and type."""
    path = cache / "gguf" / f"{model_dir.name}-{outtype}.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {model_dir.name} to {outtype} GGUF with convert_hf_to_gguf.py")
    partial = path.with_suffix(".partial")
    _run([sys.executable, "-m", "benchmarks.peers.gguf_convert", str(llama.source), "--",
          str(model_dir), "--outtype", outtype, "--outfile", str(partial)],
         cache / f"convert-{outtype}.log")
    partial.rename(path)
    return path
