"""``make gpu-check``: on a machine with a GPU, the evidence in one command.

1. builds the package with its CUDA extension for this GPU (editable, no dependency
   changes: the GPU machines have no network). ``--use-pep517`` because without it pip
   takes setuptools' legacy ``develop`` path, which (setuptools >= 80) starts a second pip
   with build isolation that tries to download setuptools: seen failing on the H100 box;
2. runs the whole test suite, where every backend test now also runs on CUDA tensors,
   including tests/test_gpu_paths.py (inductor, CUDA-graph decode, grids past 65,535);
   the CPU-side verifications of GPU code (compile gate, CUDA emulator) are skipped: the
   GPU itself is the stronger check;
3. checks every tile of this GPU's own configuration table that differs from the sm80
   table against float64 (tools/tile_probe.py --arch-changes), rows into
   ``bench/results/<device>-tiles.json``;
4. compiled generation (static cache, ``mode="reduce-overhead"``): tokens/s with and
   without PVM into ``bench/results/<device>-generation.json`` (bench/compiled_generation.py;
   fails on a graph break or tokens that differ from eager);
5. runs ``pytest bench/ --benchmark-only`` into ``bench/results/<device>.json``.

Without a GPU it says so and exits 2. Exit 1 if the build, a test or the benchmarks fail
(the benchmarks run even after a test failure: the numbers are still evidence).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(step: str, cmd, env=None) -> bool:
    print(f"\n=== {step}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    ok = subprocess.run(cmd, cwd=ROOT, env=env).returncode == 0
    print(f"=== {step}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s",
          flush=True)
    return ok


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def main() -> int:
    import torch
    if not torch.cuda.is_available():
        print("make gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is "
              "False). Run it on a machine with a GPU; `make test` is the check without one.",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    print(f"GPU: {name} (sm_{major}{minor}), torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}")
    env = dict(os.environ, PVM_STRICT_BUILD="1", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}",
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    env.pop("TRITON_INTERPRET", None)
    py = sys.executable
    results = {}
    results["build"] = run("build", [py, "-m", "pip", "install", "--no-build-isolation",
                                     "--use-pep517", "--no-deps", "-e", "."], env)
    if not results["build"]:
        return 1
    # The GPU machines have 16 cores: spread the suite over processes (pytest-xdist, when
    # installed) so the Triton JIT compiles of the parametrised cases run side by side.
    workers = os.environ.get("PVM_TEST_WORKERS", str(min(8, os.cpu_count() or 1)))
    parallel = ["-n", workers] if _has_module("xdist") and workers != "1" else []
    results["tests"] = run("tests", [py, "-m", "pytest", "tests", "-q", "-rs", "-m",
                                     "not cpu_verification and not install", "--durations=15", *parallel],
                           env)
    # The table entries this GPU's architecture has of its own (sm90 tiles that differ from
    # sm80's) have compiled spill-free but never run: one tile that compiled cleanly
    # computed dK wrongly on the H100. Each is checked against float64 here.
    probe_json = os.path.join("bench", "results", name.replace(" ", "-") + "-tiles.json")
    results["tiles"] = run("tiles", [py, os.path.join("tools", "tile_probe.py"), "--arch-changes",
                                     f"--json={probe_json}"], env)
    # Compiled generation (static cache, decode step whole under CUDA graphs): tokens/s with
    # and without PVM, zero graph breaks and eager tokens required (bench/compiled_generation.py).
    gen_json = os.path.join("bench", "results", name.replace(" ", "-") + "-generation.json")
    results["generation"] = run("generation", [py, os.path.join("bench", "compiled_generation.py"),
                                               "--mode", "reduce-overhead", f"--out={gen_json}"], env)
    out = os.path.join("bench", "results", name.replace(" ", "-") + ".json")
    results["bench"] = run("bench", [py, "-m", "pytest", "bench", "--benchmark-only", "-q",
                                     f"--benchmark-json={out}"], env)
    print("\n" + "  ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in results.items())
          + f"  -> {out}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
