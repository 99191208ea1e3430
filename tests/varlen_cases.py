"""Shared cases of the varlen (packed) retrieval tests: every backend, the emulated CUDA
kernels included, runs the same sequences against the float64 reference and against the
same sequences run padded."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from pvm_kernels import pvm_retrieval, pvm_retrieval_varlen
from pvm_kernels.reference import retrieval_varlen_reference
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs

# (name, query lengths, key lengths, H, Hkv, hd, extra rows after the last sequence (q, k)).
CASES: List[Tuple[str, Sequence[int], Sequence[int], int, int, int, Tuple[int, int]]] = [
    ("mixed", (5, 1, 17, 3), (7, 0, 40, 1), 4, 2, 16, (0, 0)),     # a sequence with no key
    ("decode", (1, 1, 1, 1, 1), (10, 33, 0, 64, 5), 4, 1, 32, (0, 0)),  # many requests, T 1
    ("8b", (9, 1, 70), (150, 3, 65), 4, 1, 128, (0, 0)),            # the 8B layout
    ("long", (130, 2), (20, 150), 2, 2, 24, (0, 0)),                # past one row block, odd hd
    ("tail", (4, 0, 6), (9, 5, 0), 4, 1, 32, (3, 5)),               # empty sequences, rows of none
]


def cu_seqlens(lengths: Sequence[int], device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def packed_inputs(q_lens, k_lens, H, Hkv, hd, extra, dtype, device):
    """float64 q/k/v, rounded to dtype and back (so the reference sees the kernel's inputs),
    with NaN in the rows no sequence owns (they must never reach a result)."""
    total_q, total_k = sum(q_lens) + extra[0], sum(k_lens) + extra[1]
    q64 = torch.randn(total_q, H, hd, dtype=torch.float64).to(dtype).double()
    k64 = torch.randn(total_k, Hkv, hd, dtype=torch.float64).to(dtype).double()
    v64 = torch.randn(total_k, Hkv, hd, dtype=torch.float64).to(dtype).double()
    if extra[1]:
        k64[sum(k_lens):] = float("nan")
        v64[sum(k_lens):] = float("nan")
    return q64, k64, v64, cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)


def run_varlen_case(backend, device, dtype, case, transform=lambda t: t):
    """Values and gradients of pvm_retrieval_varlen on ``backend`` against the float64
    reference, outputs poisoned; returns (out, dq, dk, dv)."""
    _, q_lens, k_lens, H, Hkv, hd, extra = case
    q64, k64, v64, cu_q, cu_k = packed_inputs(q_lens, k_lens, H, Hkv, hd, extra, dtype, device)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    expected = retrieval_varlen_reference(qr, kr, vr, cu_q.cpu(), cu_k.cpu())
    grad = torch.randn_like(expected).to(dtype).double()
    expected.backward(grad)
    q, k, v = (transform(t.to(dtype).to(device)).requires_grad_() for t in (q64, k64, v64))
    with poisoned_outputs():
        out = pvm_retrieval_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens),
                                   backend=backend)
        out.backward(grad.to(dtype).to(device))
    tol = TOLERANCE[dtype]
    assert max_rel_err(out, expected) < tol, "out"
    owned_k = sum(k_lens)
    for got, ref, name in ((q.grad, qr.grad, "dq"), (k.grad[:owned_k], kr.grad[:owned_k], "dk"),
                           (v.grad[:owned_k], vr.grad[:owned_k], "dv")):
        assert max_rel_err(got, ref) < tol, name
    # A sequence with no key, and rows of no sequence, give exactly 0; keys of no sequence
    # get exactly 0 gradient (NaN there never reaches anything).
    bounds = cu_q.tolist()
    for b, n in enumerate(k_lens):
        if n == 0:
            assert (out.detach()[bounds[b]:bounds[b + 1]] == 0).all()
            assert (q.grad[bounds[b]:bounds[b + 1]] == 0).all()
    assert (out.detach()[bounds[-1]:] == 0).all() and (q.grad[bounds[-1]:] == 0).all()
    assert (k.grad[owned_k:] == 0).all() and (v.grad[owned_k:] == 0).all()
    return out.detach(), q.grad, k.grad, v.grad


def pad(x: torch.Tensor, lengths: Sequence[int], longest: int) -> torch.Tensor:
    """[total, heads, hd] packed rows -> [N, longest, heads, hd], zeros after each sequence."""
    out = x.new_zeros(len(lengths), longest, *x.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start:start + n]
        start += n
    return out


def unpad(x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


def packed_and_padded(backend, device, dtype, case):
    """The same sequences through pvm_retrieval_varlen and through pvm_retrieval padded to
    the longest (key_mask from the lengths), same inputs and output gradient: two tuples
    (out, dq, dk, dv) in the packed layout, rows of sequences only."""
    _, q_lens, k_lens, H, Hkv, hd, _ = case
    q64, k64, v64, cu_q, cu_k = packed_inputs(q_lens, k_lens, H, Hkv, hd, (0, 0), dtype, device)
    grad = torch.randn_like(q64).to(dtype).to(device)
    q, k, v = (t.to(dtype).to(device).requires_grad_() for t in (q64, k64, v64))
    out = pvm_retrieval_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), backend=backend)
    out.backward(grad)
    packed = (out.detach(), q.grad, k.grad, v.grad)

    qp, kp, vp = (pad(t.to(dtype).to(device), lens, max(max(lens), 1)).requires_grad_()
                  for t, lens in ((q64, q_lens), (k64, k_lens), (v64, k_lens)))
    mask = torch.zeros(len(k_lens), kp.shape[1], dtype=torch.bool, device=device)
    for b, n in enumerate(k_lens):
        mask[b, :n] = True
    outp = pvm_retrieval(qp, kp, vp, mask, backend=backend)
    outp.backward(pad(grad, q_lens, qp.shape[1]))
    padded = (unpad(outp.detach(), q_lens), unpad(qp.grad, q_lens), unpad(kp.grad, k_lens),
              unpad(vp.grad, k_lens))
    return packed, padded
