"""The retrieval against F.scaled_dot_product_attention (cuDNN and flash kernels,
``enable_gqa=True``) and compiled FlexAttention (``enable_gqa=True``, a kv_len block mask,
the lse returned) in the same pytest process, at the 8B layout (H 4, Hkv 1, hd 128) in
bf16, forward and forward+backward, at (B, T, Nv) = (1, 8192, 2048), (1, 16384, 4096) and
(4, 2048, 2048) with kv_len (2048, 1500, 1024, 700) (``attention_impls.CASES``).

Every timed case first checks its output (and lse, and on forward+backward dq, dk, dv)
against ours (``pvm-triton``, itself checked against the float32 reference module): a
difference above 2% of the largest value fails the case, so the times compare the same
computation. Records (``benchmark.extra_info``): flops and bytes (useful work: valid keys
only, ``attention_impls.retrieval_kv_len_cost``, which sums
``pvm_kernels.roofline.retrieval_cost`` over the samples; forward+backward counts both
passes), the CUDA-event median (``triton.testing.do_bench``), TFLOP/s and
``fraction_of_matmul_peak`` against the bf16 matmul peak measured once in this process
(``conftest.measured_peaks``: an 8192^3 torch.mm), the device (GPU name) and torch /
triton versions.

SDPA's flash kernel takes no attn_mask, so the kv_len case compares ours, FlexAttention and
cuDNN (boolean attn_mask) only. An SDPA kernel that refuses the inputs (its "No available
kernel") is skipped with SDPA's reasons. On CPU every implementation is skipped with its
reason and ``test_attention_counts`` records the same FLOP / byte counts (bf16) as the GPU
run, untimed.
"""
import pytest
import torch

from attention_impls import (CASES, IMPLEMENTATIONS, _flex_lse_style, assert_lse_matches,
                             implementation_context,
                             assert_matches, make_implementation, reference_lse, sdpa_refusal,
                             unavailable_reason)
from conftest import DEVICE, measured_peaks, sync
from pvm_kernels.reference import retrieval_reference

ELEM = 2  # bf16: the bench's dtype on a GPU; the CPU run records the same counts
DTYPE = torch.bfloat16
PASSES = [pytest.param(False, id="fwd"), pytest.param(True, id="fwd_bwd")]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


@pytest.fixture(scope="session")
def matmul_peak():
    """The bf16 matmul TFLOP/s of this GPU, measured once per pytest process
    (conftest.measured_peaks: an 8192^3 torch.mm timed by triton.testing.do_bench, shared
    with the other bench modules); None on CPU."""
    return measured_peaks()[0]


def _run_info() -> dict:
    import triton

    from pvm_kernels.cli.common import device_description
    return dict(device=device_description(DEVICE), torch=torch.__version__,
                triton=triton.__version__, dtype=str(DTYPE).replace("torch.", ""))


def _case_info(case, backward: bool) -> dict:
    fwd = case.cost(ELEM)
    both = case.cost(ELEM, backward=True)
    return dict(B=case.B, T=case.T, Nv=case.Nv, H=4, Hkv=1, hd=128,
                kv_len=list(case.kv_len) if case.kv_len is not None else None,
                valid_keys=case.lengths(), backward=backward, op="retrieval",
                flops_forward=fwd.flops, flops_backward=both.flops - fwd.flops)


@pytest.mark.parametrize("backward", PASSES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_attention_counts(benchmark, case, backward):
    """The FLOP / byte counts of each case (bf16), untimed: the record the CPU run keeps.
    The timed cases below carry the same counts next to their times."""
    cost = benchmark.pedantic(case.cost, args=(ELEM, backward), rounds=1, iterations=1)
    benchmark.extra_info.update(impl="counts", timed=False, flops=cost.flops, bytes=cost.bytes,
                                h100_lower_bound_ms=cost.lower_bound_ms(),
                                **_case_info(case, backward), **_run_info())


_BASE = {}


def _baseline(case, backward: bool) -> dict:
    """Inputs (seeded) and ours' outputs / grads for a case, ours checked against the
    float32 reference once; cached for the implementations that follow."""
    key = (case.id, backward)
    if key in _BASE:
        return _BASE[key]
    _BASE.clear()  # one case's tensors at a time
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(case.B, case.T, 4, 128, device=DEVICE, dtype=DTYPE, generator=g)
    k, v = (torch.randn(case.B, case.Nv, 1, 128, device=DEVICE, dtype=DTYPE, generator=g)
            for _ in range(2))
    grad = torch.randn(q.shape, device=DEVICE, dtype=DTYPE, generator=g)
    q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
    kv_len = case.kv_len_tensor(DEVICE)
    ours = next(n for n in ("pvm-triton", "pvm-cuda") if unavailable_reason(n, DEVICE, case) is None)
    with torch.set_grad_enabled(backward):
        out, _ = make_implementation(ours, case, DEVICE)(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad) if backward else None
        # the float32 reference of the same bf16 inputs
        qf, kf, vf = (t.detach().float().requires_grad_(backward) for t in (q, k, v))
        mask = None
        if case.kv_len is not None:
            mask = torch.arange(case.Nv, device=DEVICE)[None] < kv_len[:, None]
        ref = retrieval_reference(qf, kf, vf, mask)
        ref_grads = torch.autograd.grad(ref, (qf, kf, vf), grad.float()) if backward else None
    assert_matches(ours, "output (vs the float32 reference)", out, ref)
    if backward:
        for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert_matches(ours, f"{name} (vs the float32 reference)", a, b)
    del ref, ref_grads, qf, kf, vf
    base = dict(q=q, k=k, v=v, grad=grad, kv_len=kv_len, ours=ours, out=out.detach(),
                grads=grads, lse=reference_lse(q.detach(), k.detach(), kv_len))
    _BASE[key] = base
    return base


def _check(impl: str, fn, base: dict, backward: bool) -> dict:
    """Run ``impl`` once on the baseline's inputs and compare with ours; skip where SDPA has
    no kernel for them. Returns the relative errors (recorded)."""
    q, k, v = base["q"], base["k"], base["v"]
    with torch.set_grad_enabled(backward):
        refused, result = sdpa_refusal(fn, q, k, v)
        if refused:
            pytest.skip(f"{impl}: {refused}")
        out, lse = result
        errors = {"err_output": assert_matches(impl, "output", out, base["out"])}
        if lse is not None:
            errors["err_lse"] = assert_lse_matches(impl, lse, base["lse"])
        if backward:
            grads = torch.autograd.grad(out, (q, k, v), base["grad"])
            for name, a, b in zip(("dq", "dk", "dv"), grads, base["grads"]):
                errors[f"err_{name}"] = assert_matches(impl, name, a, b)
    return errors


@pytest.mark.parametrize("backward", PASSES)
@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_attention(benchmark, matmul_peak, impl, case, backward):
    why = unavailable_reason(impl, DEVICE, case)
    if why is not None:
        pytest.skip(why)
    base = _baseline(case, backward)
    with implementation_context(impl):
        _time(benchmark, matmul_peak, impl, case, backward, base)


def _time(benchmark, matmul_peak, impl, case, backward, base):
    fn = make_implementation(impl, case, DEVICE)
    errors = _check(impl, fn, base, backward)  # also compiles FlexAttention, outside timing
    q, k, v, grad = base["q"], base["k"], base["v"], base["grad"]

    if backward:
        def work():
            out, _ = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), grad)
    else:
        def work():
            with torch.no_grad():
                fn(q, k, v)

    def run():
        work()
        sync()

    benchmark.group = f"attention {case.id} {'fwd_bwd' if backward else 'fwd'}"
    benchmark(run)
    import triton.testing
    ms = float(triton.testing.do_bench(work, return_mode="median"))
    cost = case.cost(ELEM, backward)
    tflops_peak, gbs_peak = measured_peaks()
    fields = cost.fields(ms, tflops_peak, gbs_peak)
    benchmark.extra_info.update(
        impl=impl, timed=True, event_ms=ms, tflops=fields["achieved_tflops"],
        fraction_of_matmul_peak=fields["achieved_tflops"] / matmul_peak,
        matmul_peak_tflops=matmul_peak,
        checked_against="float32 reference" if impl == base["ours"] else base["ours"],
        flex_lse_api=("return_aux" if _flex_lse_style() == "aux" else "return_lse")
        if impl == "flex" else None,
        **fields, **errors, **_case_info(case, backward), **_run_info())
