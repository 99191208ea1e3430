"""What the PVM block keeps for backward at the 8B layout and a long sequence (issue 24):
bf16, T 8192, Nv 2048, measured under FakeTensorMode (shapes only: no memory, no kernel),
not counting the block's inputs (hidden_states, visual, ffn_output) or its parameters.
The fused default (triton) must keep at most a tenth of what
the reference keeps; the reference's [B, H, T, Nv] scores alone are 256 MiB here."""
import pytest
import torch

from pvm_kernels import PVMConfig, available_backends
from pvm_kernels.testing import block_saved_bytes

MIB = 2 ** 20
T, NV = 8192, 2048


@pytest.fixture(scope="module")
def reference_bytes():
    return block_saved_bytes(PVMConfig.qwen3_vl_8b(), "reference", T, NV)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs the triton backend")
def test_fused_block_saves_a_tenth_of_the_reference(reference_bytes):
    fused = block_saved_bytes(PVMConfig.qwen3_vl_8b(), "triton", T, NV)
    print(f"saved for backward: triton {fused / MIB:.1f} MiB, reference "
          f"{reference_bytes / MIB:.1f} MiB ({fused / reference_bytes:.1%})")
    assert reference_bytes > 900 * MIB  # the measurement sees the reference's big tensors
    assert fused <= reference_bytes / 10
    # What is left, per query token: the [T, 512] tensors the backward needs (reduced text,
    # norm output, raw and normalised q, retrieval output, o_proj output, MLP input,
    # expander input: 8 x 1 KiB), the masked visual tokens (16 MiB) and the call's stacked
    # projection weights (3.25 MiB), nothing [T, D].
    assert fused < (8 * 1024 * T + 24 * MIB)


def test_fake_measurement_matches_a_real_one():
    """The FakeTensor count is the real count, on a size that fits (cpu backend or the
    reference): same storages, same bytes."""
    from pvm_kernels import FusedPVM
    from pvm_kernels.testing import saved_tensor_bytes
    cfg = PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=96, pvm_hidden_size=32)
    backend = "cpu" if "cpu" in available_backends("cpu") else "reference"
    fake = block_saved_bytes(cfg, backend, 9, 5, dtype=torch.float32)
    torch.manual_seed(0)
    block = FusedPVM(cfg)
    h = torch.randn(1, 9, 64, requires_grad=True)
    visual, ffn = torch.randn(1, 5, 64), torch.randn(1, 9, 64)
    mask = torch.ones(1, 5, dtype=torch.bool)
    real = saved_tensor_bytes(lambda: block(h, visual, mask, ffn_output=ffn, backend=backend),
                              [h, visual, ffn, mask, *block.parameters()])
    assert fake == real > 0
