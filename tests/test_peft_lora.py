"""PEFT LoRA on the PVM block's projections (issue 24): the fused paths read weights
directly (stacked gate/up and k/v GEMMs, the expander inside the merge, the MLP's
recomputation) only from plain modules; a LoRA-wrapped projection must run as PEFT wrapped
it. Checked end to end on a tiny Qwen3-VL: unmerged LoRA logits == merged LoRA logits on
every backend, with LoRA changing the logits (its B matrices are random, not zero)."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from pvm_kernels import available_backends  # noqa: E402
from pvm_kernels.integrations import apply_pvm_to_qwen3_vl, set_pvm_gate  # noqa: E402
from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch, tiny_qwen3_vl  # noqa: E402

# every Linear of the block, by the published names PEFT users target
TARGETS = [f"pvm_block.{name}" for name in (
    "text_reducer", "vision_reducer", "output_expander", "cross_attn.q_proj",
    "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj", "mlp.gate_proj",
    "mlp.up_proj", "mlp.down_proj")]
BACKENDS = [b for b in ("reference", "cpu", "triton") if b in available_backends("cpu")]


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_vl(seed=0)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerged_lora_equals_merged_lora(base, backend):
    torch.manual_seed(0)
    model = apply_pvm_to_qwen3_vl(copy.deepcopy(base), pvm_hidden_size=32, backend=backend)
    set_pvm_gate(model, 1.0)
    batch = tiny_batch([(4, 4), (8, 4)])
    plain = logits(model, batch)  # builds the fused paths' stacked weights from the base
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                             init_lora_weights=False)  # random A and B: LoRA acts
    lora = peft.get_peft_model(model, config)
    wrapped = [n for n, m in lora.named_modules() if n.endswith("pvm_block.mlp.gate_proj")]
    assert wrapped and all(type(lora.get_submodule(n)).__module__.startswith("peft")
                           for n in wrapped)
    unmerged = logits(lora, batch)
    assert (unmerged - plain).abs().max() > 1e-2, "LoRA must change the logits"
    merged_model = lora.merge_and_unload()  # plain Linears again, merged weights in place
    merged = logits(merged_model, batch)
    err = ((unmerged - merged).abs().max() / merged.abs().max()).item()
    assert err < 1e-5, f"unmerged vs merged LoRA on {backend}: {err:.2e}"
