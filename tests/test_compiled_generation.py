"""Compiled generation (issue 15): with PVM the decode step compiles whole (no graph break,
fullgraph=True works) and waits on the host no more than the stock model's.

transformers compiles the decode step of generate() when the cache is static (on CUDA by
default; CompileConfig._compile_all_devices forces it on CPU here). A graph break there cuts
the step, and on a GPU CUDA graphs ("reduce-overhead") then cover only pieces of it.
"""
import collections
import copy

import pytest
import torch

pytest.importorskip("transformers")

from torch._dynamo.utils import counters  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pvm_kernels.integrations import apply_pvm_to_qwen3_vl, set_pvm_gate  # noqa: E402
from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch, tiny_qwen3_vl  # noqa: E402

# Two images in one row, one in another, a text-only row.
GRIDS = [[(4, 4), (4, 4)], (8, 4), None]


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_vl(seed=0)


def pvm_model(base, backend):
    torch.manual_seed(0)
    model = apply_pvm_to_qwen3_vl(copy.deepcopy(base), layers=[1, 3], pvm_hidden_size=32,
                                  backend=backend)
    set_pvm_gate(model, 1.0)
    return model


def compile_config(backend, fullgraph=True):
    from transformers import CompileConfig
    config = CompileConfig(fullgraph=fullgraph, backend=backend, mode="default")
    config._compile_all_devices = True  # compile on CPU too (transformers' own switch)
    return config


def static_generate(model, batch, **kwargs):
    return model.generate(**batch, max_new_tokens=5, do_sample=False,
                          cache_implementation="static", **kwargs)


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("dynamo_backend", ["inductor"])
def test_static_cache_compiled_generate_is_one_graph_and_matches_eager(base, dynamo_backend):
    model = pvm_model(base, "cpu")
    batch = tiny_batch(GRIDS)
    eager = static_generate(model, batch, disable_compile=True)
    torch._dynamo.reset()
    counters.clear()
    got = static_generate(model, batch, compile_config=compile_config(dynamo_backend))
    assert torch.equal(got, eager)
    assert graph_breaks() == 0
    assert counters["stats"]["unique_graphs"] == 1  # every decode step replays one graph


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_decode_step_has_no_graph_break_on_any_backend(base, backend):
    from pvm_kernels import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} not usable on cpu here")
    model = pvm_model(base, backend)
    batch = tiny_batch(GRIDS)
    eager = static_generate(model, batch, disable_compile=True)
    torch._dynamo.reset()
    counters.clear()
    got = static_generate(model, batch, compile_config=compile_config("aot_eager"))
    assert torch.equal(got, eager)
    assert graph_breaks() == 0


def _dynamic_cache_graph_breaks(model, batch):
    """Graph breaks of generate()'s compiled decode steps with a dynamic cache (transformers
    compiles only static caches: its criterion is overridden on this instance), counted with
    fullgraph=False so a break is counted, not raised; and the tokens."""
    model._valid_auto_compile_criteria = lambda *args, **kwargs: True
    torch._dynamo.reset()
    counters.clear()
    tokens = model.generate(**batch, max_new_tokens=5, do_sample=False,
                            compile_config=compile_config("aot_eager", fullgraph=False))
    return graph_breaks(), tokens


def test_dynamic_cache_decode_step_adds_no_graph_break(base):
    batch = tiny_batch(GRIDS)
    stock, _ = _dynamic_cache_graph_breaks(copy.deepcopy(base), batch)
    model = pvm_model(base, "cpu")
    eager = model.generate(**batch, max_new_tokens=5, do_sample=False)
    with_pvm, tokens = _dynamic_cache_graph_breaks(model, batch)
    assert torch.equal(tokens, eager)
    assert with_pvm <= stock, (with_pvm, stock)


class HostSyncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense (a tensor read on the host: .item(), bool(tensor),
    int(tensor)) per phase, the phase set by the model's forward hooks."""

    def __init__(self):
        super().__init__()
        self.phase = None
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.phase is not None:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def _syncs_per_decode_step(model, batch):
    recorder = HostSyncs()
    steps = collections.Counter()

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids")
        recorder.phase = "decode" if ids is not None and ids.shape[1] == 1 else "prefill"
        steps[recorder.phase] += 1

    def after(module, args, kwargs, output):
        recorder.phase = None

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    try:
        with recorder:
            static_generate(model, batch, disable_compile=True)
    finally:
        for h in hooks:
            h.remove()
    assert steps["decode"] == 4
    return recorder.counts["decode"] / steps["decode"]


def test_decode_step_waits_on_the_host_no_more_than_the_stock_model(base):
    batch = tiny_batch(GRIDS)
    stock = _syncs_per_decode_step(copy.deepcopy(base), batch)
    with_pvm = _syncs_per_decode_step(pvm_model(base, "cpu"), batch)
    assert with_pvm <= stock, (with_pvm, stock)


def test_kept_memories_have_static_addresses(base):
    """The memories a request keeps are marked static inputs, so a CUDA graph of the decode
    step reads them in place (no per-step copy of K and V), as a StaticCache's tensors are."""
    from transformers import StaticCache
    model = pvm_model(base, "cpu")
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    model.generate(**tiny_batch(GRIDS), max_new_tokens=2, do_sample=False, past_key_values=cache)
    memories = cache._pvm_state.memories
    assert sorted(memories) == [1, 3]
    for memory in memories.values():
        for t in (memory.key, memory.value, memory.kv_len, memory.has_visual):
            assert getattr(t, "_dynamo_static_input_type", None) is not None


def test_reset_cache_starts_a_request_without_the_old_images(base):
    """A reused cache, reset, serves a text-only request: the old request's images must not
    leak into it (what the removed per-step length check guarded)."""
    from transformers import StaticCache
    model = pvm_model(base, "reference")
    text_only = tiny_batch([None])
    fresh = model.generate(**text_only, max_new_tokens=4, do_sample=False)
    image = tiny_batch([(8, 4)])
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
    model.generate(**image, max_new_tokens=4, do_sample=False, past_key_values=cache)
    cache.reset()
    reused = model.generate(**text_only, max_new_tokens=4, do_sample=False,
                            past_key_values=cache)
    assert torch.equal(reused, fresh)


def test_generation_bench_script_reports_tokens_per_second(tmp_path):
    """bench/compiled_generation.py, which make gpu-check runs with CUDA graphs, at toy size."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "compiled_generation.py"),
                           "--device", "cpu", "--dynamo-backend", "aot_eager", "--new-tokens", "3",
                           "--repeats", "1", f"--out={out}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["no PVM", "PVM"]
    for row in result["rows"]:
        assert row["graph_breaks"] == 0 and row["tokens_match_eager"] and row["tokens_per_s"] > 0
