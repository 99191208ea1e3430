"""A few PVM training steps on the tiny Qwen3-VL: single process, or 2 ranks (gloo, CPU)
under DDP or FSDP2. Used by tests/test_distributed.py, which runs

    python tests/distributed_train.py {ddp|fsdp2} OUT.pt

and compares OUT.pt (first-step gradients, final PVM weights) with ``train_single()``.
The paper's SFT stage: only PVM parameters train, AdamW. Rank r trains on micro-batch r;
the single process averages the two micro-batch losses, which is what DDP/FSDP2's mean
gradient reduction computes.
"""
import os
import sys
import tempfile

import torch

STEPS, LR, WORLD = 3, 1e-3, 2


def build_model():
    from pvm_kernels.integrations import apply_pvm_to_qwen3_vl, freeze_all_but_pvm, set_pvm_gate
    from pvm_kernels.integrations.tiny_qwen3_vl import tiny_qwen3_vl
    model = tiny_qwen3_vl(seed=0)
    torch.manual_seed(1)
    apply_pvm_to_qwen3_vl(model, pvm_hidden_size=32)
    set_pvm_gate(model, 0.5)  # every PVM parameter gets a gradient from the first step
    freeze_all_but_pvm(model)
    return model.train()


def micro_batches():
    from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch
    return [tiny_batch([(4, 4), None], seed=10), tiny_batch([(8, 4), (4, 4)], seed=11)]


def lm_loss(model, batch):
    from pvm_kernels.integrations.tiny_qwen3_vl import IMAGE_TOKEN
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == IMAGE_TOKEN)] = -100
    return model(**batch, labels=labels).loss


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, loss_of_step):
    params = trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=LR)
    first_grads = None
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of_step().backward()
        if step == 0:
            first_grads = {n: _full(p.grad).detach().clone() for n, p in params.items()}
        opt.step()
    weights = {n: _full(p.detach()).clone() for n, p in params.items()}
    return dict(grads=first_grads, weights=weights)


def train_single():
    model, batches = build_model(), micro_batches()
    return train(model, lambda: sum(lm_loss(model, b) for b in batches) / len(batches))


def _worker(rank, mode, init_file, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    torch.set_num_threads(1)
    model = build_model()
    batch = micro_batches()[rank]
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
        result = train(model, lambda: lm_loss(wrapped, batch))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.language_model.layers:  # one unit per decoder layer
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        result = train(model, lambda: lm_loss(model, batch))
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def main(mode, out):
    import torch.multiprocessing as mp
    if mode not in ("ddp", "fsdp2"):
        raise SystemExit(f"mode must be ddp or fsdp2, got {mode!r}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(mode, os.path.join(tmp, "pg"), out), nprocs=WORLD)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], sys.argv[2])
