"""The host checks of tests/test_cuda_emulator.py that need two devices: the CUDA
backend's op wrappers refuse a tensor on another device, naming it, before any launch
(the emulator runs on CPU tensors only, so there it can check dtypes and shapes but not
devices). Skipped without a GPU."""
import pytest
import torch

from pvm_kernels.ops.registration import get_op

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: tensors on two devices")

BWD_R = ["grad_out", "q", "k", "v", "out", "lse", "key_mask", "kv_len", "scale"]
BWD_M = ["grad_out", "expanded", "gate", "keep", "rstd"]


def _retrieval_args():
    q = torch.randn(2, 3, 4, 16, device="cuda")
    k = torch.randn(2, 5, 2, 16, device="cuda")
    v = torch.randn(2, 5, 2, 16, device="cuda")
    out, lse = get_op("native", "retrieval_fwd")(q, k, v, None, None, 0.25)
    return dict(grad_out=torch.randn_like(q), q=q, k=k, v=v, out=out, lse=lse, key_mask=None,
                kv_len=None, scale=0.25)


def _merge_args():
    e = torch.randn(3, 4, 32, device="cuda")
    gate = torch.tensor([0.5], device="cuda")
    _, rstd = get_op("native", "merge_fwd")(e, gate, None, None, 1e-6)
    return dict(grad_out=torch.randn_like(e), expanded=e, gate=gate, keep=None, ffn_output=None,
                rstd=rstd, eps=1e-6)


@pytest.mark.parametrize("arg", ["grad_out", "out", "lse", "k", "v", "key_mask", "kv_len"])
def test_cuda_retrieval_wrapper_refuses_a_tensor_on_another_device(arg):
    args = _retrieval_args()
    if arg == "key_mask":
        args[arg] = torch.ones(2, 5, dtype=torch.bool)
    elif arg == "kv_len":
        args[arg] = torch.full((2,), 5, dtype=torch.int32)
    else:
        args[arg] = args[arg].cpu()
    with pytest.raises(RuntimeError, match=f"{arg} must be on q's device cuda:0, got cpu"):
        get_op("native", "retrieval_bwd")(*[args[n] for n in BWD_R])


@pytest.mark.parametrize("arg", ["grad_out", "rstd", "gate", "keep"])
def test_cuda_merge_wrapper_refuses_a_tensor_on_another_device(arg):
    args = _merge_args()
    args[arg] = torch.ones(3, 4, dtype=torch.bool) if arg == "keep" else args[arg].cpu()
    with pytest.raises(RuntimeError, match=f"{arg} must be on expanded's device cuda:0, got cpu"):
        get_op("native", "merge_bwd")(*[args[n] for n in BWD_M])
