"""pvm_retrieval on every backend against the float64 reference: values and gradients."""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import available_backends, pvm_retrieval
from pvm_kernels.reference import retrieval_reference
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs, random_mask

DTYPES = [torch.float32, torch.bfloat16]

# (B, T, H, Hkv, hd, Nv, mask kind): 8B-like head layout, MHA, odd sizes, Nv = 1, decode.
SHAPES = [
    (2, 9, 4, 1, 32, 70, "pad"),
    (3, 5, 4, 2, 16, 37, "mixed"),      # one sample with no visual token, one padded
    (1, 1, 4, 1, 32, 130, None),        # decode step, Nv past two key blocks
    (2, 67, 2, 2, 16, 1, None),         # Nv = 1, T past one row block
    (2, 3, 3, 1, 24, 19, "holes"),      # hd not a power of two, holes in the mask
    (2, 5, 4, 1, 128, 150, "pad"),      # the 8B layout: H 4, Hkv 1, hd 128
    (1, 1, 4, 1, 128, 300, None),       # an 8B decode step
]

# Head dims across every BLOCK_D bucket of the Triton kernels (16 .. 256), powers of two
# and not, as flash-attention's tests sweep 32-256.
HEAD_DIMS = [8, 24, 40, 64, 96, 128, 160, 256]


def make_mask(kind, B, Nv):
    if kind is None:
        return None
    if kind == "pad":
        return random_mask(B, Nv, pad_from={b: Nv - 7 * (b + 1) for b in range(B)})
    if kind == "mixed":
        return random_mask(B, Nv, empty_rows=[1], pad_from={2: 5})
    return random_mask(B, Nv, holes=0.3)


def run_case(backend, device, dtype, B, T, H, Hkv, hd, Nv, mask, transform=lambda t: t,
             with_len=False):
    q64 = torch.randn(B, T, H, hd, dtype=torch.float64)
    k64 = torch.randn(B, Nv, Hkv, hd, dtype=torch.float64)
    v64 = torch.randn(B, Nv, Hkv, hd, dtype=torch.float64)
    # The reference sees the same rounded inputs: only the kernel's own error is measured.
    q, k, v = [transform(t.to(dtype)).to(device).requires_grad_() for t in (q64, k64, v64)]
    qr, kr, vr = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    expected = retrieval_reference(qr, kr, vr, mask)
    grad = torch.randn_like(expected)
    expected.backward(grad)

    kv_len = None
    if with_len and mask is not None:
        kv_len = (mask.int() * torch.arange(1, Nv + 1)).amax(1).int().to(device)
    dmask = None if mask is None else mask.to(device)
    with poisoned_outputs():
        out = pvm_retrieval(q, k, v, dmask, kv_len, backend=backend)
        out.backward(grad.to(dtype).to(device))
    tol = TOLERANCE[dtype]
    assert max_rel_err(out, expected) < tol
    for got, ref, name in ((q.grad, qr.grad, "dq"), (k.grad, kr.grad, "dk"), (v.grad, vr.grad, "dv")):
        assert max_rel_err(got, ref) < tol, name
    if mask is not None:
        empty = ~mask.any(1)
        assert (out.detach().cpu()[empty] == 0).all()
        assert (q.grad.cpu()[empty] == 0).all()
        # Gradients never reach invalid keys.
        assert (k.grad.cpu()[~mask] == 0).all() and (v.grad.cpu()[~mask] == 0).all()
    return out


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_retrieval_matches_reference(backend, device, dtype, shape):
    *dims, kind = shape
    B, T, H, Hkv, hd, Nv = dims
    run_case(backend, device, dtype, *dims, make_mask(kind, B, Nv), with_len=kind == "pad")


def head_dim_refusal(backend, device, hd, dtype):
    """Why ``backend`` refuses head dim ``hd`` in ``dtype`` (None if it takes it)."""
    from pvm_kernels.ops import resolve_backend
    return resolve_backend(backend, torch.device(device)).head_dim_check(hd, dtype)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_retrieval_head_dims(backend, device, dtype, hd):
    """Every head dim a backend takes matches the reference; one it refuses raises a
    ValueError naming the limit before any launch (triton: 128 in float32)."""
    mask = make_mask("mixed", 3, 37)[1:]
    if head_dim_refusal(backend, device, hd, dtype) is not None:
        with pytest.raises(ValueError, match=rf"backend '{backend}': head_dim must be .* got {hd}"):
            run_case(backend, device, dtype, 2, 3, 4, 2, hd, 37, mask)
        return
    run_case(backend, device, dtype, 2, 3, 4, 2, hd, 37, mask)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("hd", [4, 12, 264, 512])
def test_retrieval_rejects_unsupported_head_dims_before_launch(backend, device, hd):
    q = torch.randn(1, 2, 2, hd, device=device)
    k = torch.randn(1, 3, 1, hd, device=device)
    if head_dim_refusal(backend, device, hd, torch.float32) is None:
        pvm_retrieval(q, k, k, backend=backend)  # accepted: it runs
        return
    with pytest.raises(ValueError, match=rf"backend '{backend}': head_dim must be .* got {hd}"):
        pvm_retrieval(q, k, k, backend=backend)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_non_contiguous_inputs(backend, device):
    # Transposed storage: q, k, v are views with permuted strides.
    swap = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    assert not swap(torch.randn(2, 3, 4, 5)).is_contiguous()
    run_case(backend, device, torch.float32, 2, 7, 4, 2, 16, 21,
             make_mask("mixed", 3, 21)[[1, 2]], transform=swap)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_kv_len_bounds_keys(backend, device):
    q = torch.randn(2, 3, 2, 16, device=device)
    k = torch.randn(2, 10, 1, 16, device=device)
    v = torch.randn(2, 10, 1, 16, device=device)
    kv_len = torch.tensor([4, 0], dtype=torch.int32, device=device)
    got = pvm_retrieval(q, k, v, None, kv_len, backend=backend)
    expected = retrieval_reference(q, k[:, :4], v[:, :4])
    assert max_rel_err(got[0], expected[0]) < 1e-5
    assert (got[1] == 0).all()


# kv_len outside [0, Nv]: above means every key, at or below 0 none. Clamped inside the
# kernels: an unclamped 2^20 read past the keys (a crash on cpu, an illegal address on GPU).
KV_LEN_EDGES = [5, 6, 9, 2**20, 2**31 - 1, 0, -1, -7, -2**31]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_retrieval_kv_len_outside_range_is_clamped(backend, device, with_mask):
    B, T, H, Hkv, hd, Nv = len(KV_LEN_EDGES), 2, 4, 2, 16, 5
    q = torch.randn(B, T, H, hd, requires_grad=True)
    k = torch.randn(B, Nv, Hkv, hd, requires_grad=True)
    v = torch.randn(B, Nv, Hkv, hd, requires_grad=True)
    mask = random_mask(B, Nv, holes=0.3) if with_mask else torch.ones(B, Nv, dtype=torch.bool)
    kv_len = torch.tensor(KV_LEN_EDGES, dtype=torch.int32)
    clamped = kv_len.clamp(0, Nv)
    valid = mask & (torch.arange(Nv)[None, :] < clamped[:, None])
    qr, kr, vr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = retrieval_reference(qr, kr, vr, valid)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    qd, kd, vd = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
    with poisoned_outputs():
        got = pvm_retrieval(qd, kd, vd, mask.to(device) if with_mask else None,
                            kv_len.to(device), backend=backend)
        got.backward(grad.float().to(device))
    assert max_rel_err(got, expected) < 1e-4
    for g, r in ((qd.grad, qr.grad), (kd.grad, kr.grad), (vd.grad, vr.grad)):
        assert max_rel_err(g, r) < 1e-4
    none = clamped == 0
    assert (got.detach().cpu()[none] == 0).all() and (qd.grad.cpu()[none] == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_nan_in_padding_stays_out(backend, device):
    q = torch.randn(2, 4, 2, 16, device=device)
    k = torch.randn(2, 9, 1, 16, device=device)
    v = torch.randn(2, 9, 1, 16, device=device)
    mask = random_mask(2, 9, pad_from={0: 5}).to(device)
    k[0, 5:] = float("nan")
    v[0, 5:] = float("inf")
    got = pvm_retrieval(q, k, v, mask, backend=backend)
    expected = retrieval_reference(q, k[:, :5], v[:, :5])
    assert max_rel_err(got[0], expected[0]) < 1e-5


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_rejects_bad_arguments(backend, device):
    q = torch.randn(1, 2, 4, 16, device=device)
    k = torch.randn(1, 5, 1, 16, device=device)
    with pytest.raises(ValueError, match="v must have shape"):
        pvm_retrieval(q, k, k[:, :4], backend=backend)
    with pytest.raises(TypeError, match="key_mask must have dtype torch.bool"):
        pvm_retrieval(q, k, k, torch.ones(1, 5, device=device), backend=backend)
    with pytest.raises(ValueError, match="multiple of k heads"):
        pvm_retrieval(q, torch.randn(1, 5, 3, 16, device=device),
                      torch.randn(1, 5, 3, 16, device=device), backend=backend)


@pytest.mark.parametrize("backend,device", [p for p in backend_device_params()
                                            if p.values[0] != "reference"])
@pytest.mark.parametrize("bad", ["lse-shape", "lse-dtype", "grad-shape", "grad-dtype",
                                 "out-shape", "kv_len-dtype", "mask-shape"])
def test_backward_op_checks_every_tensor_before_launch(backend, device, bad):
    """A direct call of a kernel backend's backward op (bypassing the Python checks) with a
    wrong saved tensor fails with a message naming it, instead of reading out of bounds."""
    from conftest import op_prefix
    from pvm_kernels.ops.registration import get_op
    q = torch.randn(2, 3, 4, 16, device=device)
    k = torch.randn(2, 5, 2, 16, device=device)
    out, lse = get_op(op_prefix(backend), "retrieval_fwd")(q, k, k, None, None, 0.25)
    args = dict(grad_out=torch.randn_like(out), out=out, lse=lse, key_mask=None, kv_len=None)
    name = bad.split("-")[0].replace("grad", "grad_out").replace("mask", "key_mask")
    if bad == "lse-shape":
        args["lse"] = lse[:, :, :2]
    elif bad == "lse-dtype":
        args["lse"] = lse.double()
    elif bad == "grad-shape":
        args["grad_out"] = args["grad_out"][:, :2]
    elif bad == "grad-dtype":
        args["grad_out"] = args["grad_out"].half()
    elif bad == "out-shape":
        args["out"] = out[:1]
    elif bad == "kv_len-dtype":
        args["kv_len"] = torch.full((2,), 5, dtype=torch.int64, device=device)
    else:
        args["key_mask"] = torch.ones(2, 4, dtype=torch.bool, device=device)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        get_op(op_prefix(backend), "retrieval_bwd")(
            args["grad_out"], q, k, k, args["out"], args["lse"], args["key_mask"],
            args["kv_len"], 0.25)


# ---- split-KV forward and split-row dK/dV (triton) ------------------------------------------

def triton_launchers():
    pytest.importorskip("triton")
    from pvm_kernels import available_backends
    if "triton" not in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("triton not usable here")
    from pvm_kernels.triton_ops import retrieval
    return retrieval


def test_split_loop_fills_the_gpu_and_never_splits_below_one_block():
    R = triton_launchers()
    cpu = torch.device("cpu")  # counts as 132 SMs, an H100's
    assert R.split_loop(4096, 64, 1, cpu) == (64, 64)       # decode at batch 1: 64 splits
    assert R.split_loop(4096, 64, 16, cpu) == (16, 256)     # 16 programs: 16 splits of 4 blocks
    assert R.split_loop(4096, 64, 264, cpu) == (1, 4096)    # 2 programs per SM: no split
    assert R.split_loop(100, 64, 1, cpu) == (2, 64)         # never below one block
    assert R.split_loop(1, 64, 1, cpu) == (1, 64)


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else ["cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_and_unsplit_launches_agree(device, dtype, monkeypatch):
    """The split paths (keys among programs in the forward, rows in dK/dV) against the same
    launch with splitting off, and both against float64: values and gradients, with a
    padded sample, an empty sample and kv_len cutting mid-split."""
    R = triton_launchers()
    B, T, H, Hkv, hd, Nv = 3, 20, 4, 1, 64, 300  # 80 packed rows: 2 row blocks to split
    mask = make_mask("pad", B, Nv)
    mask[2] = False  # a sample without any visual token
    kv_len = torch.tensor([200, 300, 0], dtype=torch.int32)
    q, k, v = (torch.randn(*s, dtype=torch.float64).to(dtype).to(device).requires_grad_()
               for s in ((B, T, H, hd), (B, Nv, Hkv, hd), (B, Nv, Hkv, hd)))
    go = torch.randn(B, T, H, hd, dtype=dtype, device=device)
    dev_mask, dev_len = mask.to(device), kv_len.to(device)

    def run():
        with poisoned_outputs():
            out = pvm_retrieval(q, k, v, dev_mask, dev_len, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), go)
        return [out.detach(), *grads]

    rows, dev = T * (H // Hkv), torch.device(device)
    fwd, dkdv = (R.select_config(kernel, dtype, rows, hd, dev) for kernel in ("fwd", "dkdv"))

    def splits():
        fwd_programs = -(-rows // fwd.block_m) * B * Hkv
        dkdv_programs = -(-Nv // dkdv.block_n) * B * Hkv
        return (R.split_loop(Nv, fwd.block_n, fwd_programs, dev)[0],
                R.split_loop(rows, dkdv.block_m, dkdv_programs, dev)[0])

    assert min(splits()) > 1
    split = run()
    monkeypatch.setattr(R, "PROGRAMS_PER_SM", 0)  # every loop in one program
    assert splits() == (1, 1)
    whole = run()
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = retrieval_reference(q64, k64, v64, mask & (torch.arange(Nv)[None] < kv_len[:, None]))
    expected = [ref.detach(), *torch.autograd.grad(ref, (q64, k64, v64), go.double().cpu())]
    tol = TOLERANCE[dtype]
    for name, a, b, e in zip(("out", "dq", "dk", "dv"), split, whole, expected):
        assert max_rel_err(a, e) < tol, f"split {name}"
        assert max_rel_err(b, e) < tol, f"unsplit {name}"
    assert torch.equal(split[0][2], torch.zeros_like(split[0][2])), "empty sample not 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_long_blocks_and_key_partitions(dtype):
    """The CPU kernels' prefill blocking: 600 packed rows (two 512-row blocks in the
    backward), 700 keys (a 512-key forward block and a 188-key remainder; six 128-key blocks
    in three backward partitions whose dQ partials are summed), padding and kv_len."""
    torch.manual_seed(0)
    B, T, H, Hkv, hd, Nv = 2, 150, 4, 1, 64, 700
    run_case("cpu", "cpu", dtype, B, T, H, Hkv, hd, Nv, make_mask("pad", B, Nv), with_len=True)


def test_one_configuration_table_per_architecture():
    """sm80 and sm90 tables cover the same keys; sm90 has its own prefill tiles; CPU
    tensors take the compile target's table and SM count (sm90 and 132 outside it)."""
    from pvm_kernels.triton_ops.common import compile_target
    R = triton_launchers()
    keys = {arch: {k[1:] for k in R.CONFIGS if k[0] == arch} for arch in ("sm80", "sm90")}
    assert keys["sm80"] == keys["sm90"] and keys["sm80"]
    differ = {k for k in keys["sm90"] if R.CONFIGS[("sm90",) + k] != R.CONFIGS[("sm80",) + k]}
    assert ("fwd", "16bit", 128, "prefill") in differ
    assert all(k[3] == "prefill" for k in differ)  # decode keeps the GPU-verified tiles
    cpu = torch.device("cpu")
    assert R.arch_of(cpu) == "sm90" and R.sm_count(cpu) == 132
    with compile_target(80):
        assert R.arch_of(cpu) == "sm80" and R.sm_count(cpu) == 108
        assert R.select_config("fwd", torch.bfloat16, 512, 128, cpu) == \
            R.CONFIGS[("sm80", "fwd", "16bit", 128, "prefill")]
    with pytest.raises(ValueError, match="capability"):
        with compile_target(75):
            pass


@pytest.mark.parametrize("cap,arch", [((8, 0), "sm80"), ((8, 6), "sm80"), ((8, 9), "sm80"),
                                      ((9, 0), "sm90"), ((10, 0), "sm90"), ((7, 5), "sm80")])
def test_cuda_devices_pick_the_newest_table_not_above_them(monkeypatch, cap, arch):
    R = triton_launchers()
    from pvm_kernels.triton_ops import common
    monkeypatch.setattr(common, "_CAPABILITY", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    assert R.arch_of(torch.device("cuda", 0)) == arch


@pytest.mark.parametrize("cap", [80, 90])
def test_each_architecture_table_runs_right_in_the_interpreter(cap):
    """The sm80 and sm90 tiles (prefill 16-bit at head dim 128 differs) against float64:
    the interpreter runs whichever table the compile target picks."""
    from pvm_kernels.triton_ops.common import INTERPRET, compile_target
    if not INTERPRET:
        pytest.skip("runs the Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    with compile_target(cap):
        run_case("triton", "cpu", torch.bfloat16, 2, 40, 4, 1, 128, 150, make_mask("pad", 2, 150),
                 with_len=True)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs the triton backend")
def test_split_forward_merges_in_kernel_and_leaves_its_tickets_at_zero():
    """The last split of each row block merges the partials and resets its ticket: the
    next launch on the stream (here the same problem again) must find every ticket at 0,
    or its merge would run early or never."""
    from pvm_kernels.triton_ops import retrieval as R
    q, k, v = torch.randn(2, 3, 4, 32), torch.randn(2, 300, 2, 32), torch.randn(2, 300, 2, 32)
    expected = pvm_retrieval(q, k, v, backend="reference")
    for _ in range(2):
        with poisoned_outputs():
            got = pvm_retrieval(q, k, v, backend="triton")
        assert max_rel_err(got, expected) < 1e-5
        tickets = R._TICKETS[("cpu", None)]
        assert tickets.abs().sum() == 0
