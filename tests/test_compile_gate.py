"""The ahead-of-time compile gate (tools/compile_gate.py): every Triton specialisation the
launchers can produce compiles for sm_80 and sm_90 within the targets' limits, and the
gate's checks bite. Runs in subprocesses without TRITON_INTERPRET: the gate compiles for
the GPU, which the interpreter never does."""
import json
import os
import re
import subprocess
import sys

import pytest
import triton

pytestmark = pytest.mark.cpu_verification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "compile_gate_probe.py")
TABLE = os.path.join(ROOT, "docs", "kernel_resources.md")
# The page holding the compile-gate block that `make compile-gate` rewrites (--readme).
README = os.path.join(ROOT, "docs", "verification.md")
# The GPU machines' Triton, installed there by `make test` (pip --target).
TRITON_GPU_BOX = os.path.join(ROOT, "build", "triton-3.6")


def run(args, interpret=False, timeout=900, pythonpath=None):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def probe(*args, interpret=False):
    res = run([PROBE, *args], interpret=interpret)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    (out / "verification.md").write_text(open(README).read())
    res = run([os.path.join("tools", "compile_gate.py"), "--no-progress", "--json",
               str(out / "gate.json"), "--markdown", str(out / "table.md"), "--readme",
               str(out / "verification.md")], timeout=1500)
    return res, out


def test_every_specialisation_compiles_for_sm80_and_sm90(gate_run):
    res, out = gate_run
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    report = json.loads((out / "gate.json").read_text())
    assert report["failures"] == []
    records = report["records"]
    assert {r["target"] for r in records} == {80, 90}
    assert all(r["error"] is None and r["local"] == 0 for r in records)
    # forward (merging its own splits), the backward's kernels, both merge kernels and the
    # glue, each in every dtype
    kernels = {(r["kernel"], r["dtype"]) for r in records}
    for k in ("retrieval_fwd_kernel", "retrieval_delta_kernel", "retrieval_bwd_dq_kernel",
              "retrieval_bwd_dkdv_kernel", "retrieval_bwd_finish_kernel", "merge_fwd_kernel",
              "merge_bwd_kernel", "rms_norm_fwd_kernel", "rms_norm_bwd_kernel",
              "swiglu_fwd_kernel", "swiglu_bwd_kernel", "visual_kv_fwd_kernel"):
        for dt in ("float16", "bfloat16", "float32"):
            assert (k, dt) in kernels
    # the paged decode retrieval: 16-bit only (fp32 takes the gather path)
    for dt in ("float16", "bfloat16"):
        assert ("paged_retrieval_fwd_kernel", dt) in kernels


def test_committed_resource_tables_are_the_gates(gate_run):
    """docs/kernel_resources.md and docs/verification.md's compile-gate block are rewritten
    by `make compile-gate`; a kernel or table change that alters registers or shared memory
    must update them (same Triton only: other versions allocate differently)."""
    res, out = gate_run
    committed = open(TABLE).read()
    m = re.search(r"triton (\d+\.\d+\.\d+)", committed)
    if m is None or m.group(1) != triton.__version__:
        pytest.skip(f"tables made with triton {m and m.group(1)}, here {triton.__version__}")
    assert committed == (out / "table.md").read_text(), \
        "docs/kernel_resources.md is stale: run `make compile-gate`"
    assert open(README).read() == (out / "verification.md").read_text(), \
        "docs/verification.md's compile-gate block is stale: run `make compile-gate`"
    compiled = [r for r in json.loads((out / "gate.json").read_text())["records"]
                if r["how"] == "compiled"]
    assert not compiled, (f"{len(compiled)} specialisations are not in the compile record "
                          "(tools/compile_record/): run `make compile-gate`")


def _record_run(tmp_path, record: dict):
    """The gate on the merge kernels for sm_90 (440 specialisations) with ``record`` as its
    compile record; (exit status, summary line, output)."""
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"triton": triton.__version__, "results": record}))
    res = run([os.path.join("tools", "compile_gate.py"), "--no-progress", "--only", "merge",
               "--targets", "90", "--record", str(path)])
    summary = next((line for line in res.stdout.splitlines() if line.startswith("compile gate")),
                   "")
    return res.returncode, summary, res.stdout + res.stderr


@pytest.fixture(scope="module")
def committed_record():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import compile_record
    sys.path.pop(0)
    record = compile_record.load(compile_record.record_path(triton.__version__))
    if not record:
        pytest.skip(f"no compile record for triton {triton.__version__}")
    return compile_record, record


def test_the_compile_record_is_spot_checked_and_completed(tmp_path, committed_record):
    """One gate run (merge kernels, sm_90) with a record that is wrong where it is
    spot-checked (stale, or edited by hand) and lacks three keys (a changed kernel): the
    wrong entries fail the gate, the missing ones compile for real."""
    compile_record, record = committed_record
    missing = sorted(k for k, v in record.items() if v["kernel"] == "merge_fwd_kernel"
                     and v["target"] == 90 and not compile_record.spot_checked(k))[:3]
    assert len(missing) == 3
    edited = {k: dict(v, registers=v["registers"] + 8) if compile_record.spot_checked(k) else v
              for k, v in record.items() if k not in missing}
    code, summary, out = _record_run(tmp_path, edited)
    assert code == 1 and "stale or wrong compile record" in out, out[-3000:]
    assert ": 3 compiled," in summary and " 0 recalled and compiled" not in summary, summary


def test_every_specialisation_compiles_with_the_gpu_machines_triton(tmp_path):
    """The GPU machines run triton 3.6 (docs/gpu_facts.md), which allocates registers
    differently: the same gate with it (make test installs it in build/triton-3.6)."""
    if not os.path.isfile(os.path.join(TRITON_GPU_BOX, "triton", "__init__.py")):
        pytest.skip("build/triton-3.6 is missing: `make test` installs it")
    res = run([os.path.join("tools", "compile_gate.py"), "--no-progress", "--json",
               str(tmp_path / "gate.json")], timeout=1500, pythonpath=TRITON_GPU_BOX)
    assert "compile gate (triton 3.6" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert ": 0 compiled," in res.stdout, \
        "tools/compile_record/triton-3.6.0.json is stale: run `make compile-gate`"


def test_the_interpreter_accepts_what_the_gpu_compiler_rejects():
    """Why the gate exists: a constexpr branch returning a tile of another shape runs in
    the interpreter and fails to compile for either GPU target."""
    assert probe("interpreter-accepts", interpret=True)["ran"]
    errors = probe("shape-mismatch")["errors"]
    for cap in ("80", "90"):
        assert errors[cap] is not None and "Return type mismatch" in errors[cap]


def test_gate_fails_on_shared_memory_above_the_a100_limit():
    # fp32 64 x 64 tiles of hd 128 with 3 stages: the A100 cannot hold them (sm_90 can).
    failures = probe("table-entry", json.dumps(["fwd", "fp32", 128, "prefill"]),
                     json.dumps(dict(block_m=64, block_n=64, num_warps=4, num_stages=3)),
                     json.dumps([80]))
    assert any("shared memory" in f and "A100" in f for f in failures["failures"]), failures


def test_gate_fails_on_register_spills():
    # dK/dV at 64 x 64 x 128 on 4 warps: two fp32 accumulators of 64 registers each, plus
    # the tiles, exceed 255 registers per thread.
    failures = probe("table-entry", json.dumps(["dkdv", "16bit", 128, "prefill"]),
                     json.dumps(dict(block_m=64, block_n=64, num_warps=4, num_stages=2)),
                     json.dumps([90]))
    assert any("register spill" in f for f in failures["failures"]), failures


def test_gate_fails_on_a_table_entry_no_launch_reaches():
    failures = probe("unreachable-entry")["failures"]
    assert failures and all("never compiled" in f for f in failures)


def test_an_interpreter_that_cannot_run_the_kernels_is_refused_up_front():
    """Triton 3.6's interpreter cannot take a loop bound loaded from memory with NumPy >=
    2.4 (int() of a 1-element array): the triton backend says so on CPU instead of failing
    inside the first launch. Triton 3.8's interpreter runs it (the rest of the suite)."""
    if not os.path.isfile(os.path.join(TRITON_GPU_BOX, "triton", "__init__.py")):
        pytest.skip("build/triton-3.6 is missing: `make test` installs it")
    code = ("import json, numpy, triton; from pvm_kernels import backend_status; "
            "print(json.dumps([triton.__version__, numpy.__version__, backend_status('cpu')['triton']]))")
    res = run(["-c", code], interpret=True, pythonpath=TRITON_GPU_BOX)
    assert res.returncode == 0, res.stderr[-3000:]
    version, np_version, why = json.loads(res.stdout.strip().splitlines()[-1])
    assert version.startswith("3.6")
    if tuple(int(x) for x in np_version.split(".")[:2]) >= (2, 4):
        assert why is not None and "loop bound loaded from memory" in why, why
    else:
        assert why is None, why


def test_sm90_prefill_loads_tiles_through_tma_and_multiplies_with_wgmma():
    """Issue 25: the sm_90 bf16 prefill retrieval at the 8B layout (hd 128, no key_mask)
    compiles its forward, dQ and dK/dV kernels to TMA box loads (cp.async.bulk.tensor) and
    Hopper's warpgroup MMA (wgmma), never Ampere's mma.sync; the same problem with pointer
    loads forced has no TMA load (so the count is the path's, not always there)."""
    counts = probe("ptx-instructions")["counts"]
    for kernel in ("retrieval_fwd_kernel", "retrieval_bwd_dq_kernel",
                   "retrieval_bwd_dkdv_kernel"):
        tma, pointer = counts[f"{kernel}:tma"], counts[f"{kernel}:pointer"]
        assert tma["TMA"] and not pointer["TMA"], kernel
        assert tma["cp.async.bulk.tensor"] > 0, (kernel, tma)
        assert tma["wgmma.mma_async"] > 0 and tma["mma.sync"] == 0, (kernel, tma)
        assert pointer["cp.async.bulk.tensor"] == 0, (kernel, pointer)
        assert pointer["wgmma.mma_async"] > 0, (kernel, pointer)
