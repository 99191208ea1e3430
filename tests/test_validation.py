"""Bad input at the public API: a ValueError/TypeError naming the argument, with expected vs
actual shape or dtype, raised before any kernel runs; and no host sync on the decode path."""
import pytest
import torch

from pvm_kernels import FusedPVM, PVMConfig, pvm_merge, pvm_retrieval
from pvm_kernels.ops.registry import Backend, register_backend, unregister_backend

D = 64
CFG = PVMConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, pvm_hidden_size=32)  # H 2, Hkv 1


def _launched(*_):
    raise AssertionError("a kernel ran although the arguments were invalid")


@pytest.fixture(scope="module", autouse=True)
def spy_backend():
    """A backend whose kernels fail the test if they are ever reached."""
    register_backend(Backend("spy", _launched, _launched, check=lambda device_type: None,
                             dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)))
    yield
    unregister_backend("spy")


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return FusedPVM(CFG)


def h(B=2, T=3, d=D, **kw):
    return torch.randn(B, T, d, **kw)


def vis(B=2, Nv=5, d=D, **kw):
    return torch.randn(B, Nv, d, **kw)


META = torch.device("meta")  # a second device that exists on every machine

BLOCK_CASES = {
    "hidden rank": (lambda b: b(torch.randn(3, D), vis()), ValueError,
                    ["hidden_states", "[B, T, 64]", "(3, 64)"]),
    "hidden type": (lambda b: b([[0.0]], vis()), TypeError, ["hidden_states", "list"]),
    "hidden D": (lambda b: b(h(d=63), vis()), ValueError, ["hidden_states", "[B, T, 64]", "63"]),
    "hidden int": (lambda b: b(h().long(), vis()), TypeError, ["hidden_states", "int64"]),
    "visual rank": (lambda b: b(h(), torch.randn(5, D)), ValueError, ["visual", "(5, 64)"]),
    "visual type": (lambda b: b(h(), "image"), TypeError, ["visual", "str"]),
    "visual D": (lambda b: b(h(), vis(d=32)), ValueError, ["visual", "[B, Nv, 64]", "32"]),
    "visual batch": (lambda b: b(h(B=2), vis(B=3)), ValueError, ["visual", "batch", "3", "2"]),
    "visual dtype": (lambda b: b(h(), vis(dtype=torch.float64)), TypeError,
                     ["visual", "float64", "float32"]),
    "visual device": (lambda b: b(h(), vis(device=META)), ValueError, ["visual", "meta", "cpu"]),
    "mask dtype": (lambda b: b(h(), vis(), torch.ones(2, 5, dtype=torch.int64)), TypeError,
                   ["visual_mask", "torch.bool", "int64"]),
    "mask shape": (lambda b: b(h(), vis(), torch.ones(2, 4, dtype=torch.bool)), ValueError,
                   ["visual_mask", "(2, 5)", "(2, 4)"]),
    "mask device": (lambda b: b(h(), vis(), torch.ones(2, 5, dtype=torch.bool, device=META)),
                    ValueError, ["visual_mask", "meta"]),
    "query dtype": (lambda b: b(h(), vis(), query_is_visual=torch.zeros(2, 3)), TypeError,
                    ["query_is_visual", "torch.bool", "float32"]),
    "query shape": (lambda b: b(h(), vis(), query_is_visual=torch.zeros(2, 4, dtype=torch.bool)),
                    ValueError, ["query_is_visual", "(2, 3)", "(2, 4)"]),
    "query device": (lambda b: b(h(), vis(), query_is_visual=torch.zeros(2, 3, dtype=torch.bool,
                                                                          device=META)),
                     ValueError, ["query_is_visual", "meta"]),
    "ffn shape": (lambda b: b(h(), vis(), ffn_output=h(T=4)), ValueError,
                  ["ffn_output", "(2, 3, 64)", "(2, 4, 64)"]),
    "ffn dtype": (lambda b: b(h(), vis(), ffn_output=h(dtype=torch.float64)), TypeError,
                  ["ffn_output", "float64", "float32"]),
    "ffn device": (lambda b: b(h(), vis(), ffn_output=h(device=META)), ValueError,
                   ["ffn_output", "meta"]),
    "mask with memory": (lambda b: b(h(), b.encode_visual(vis()), torch.ones(2, 5, dtype=torch.bool)),
                         ValueError, ["visual_mask", "VisualMemory"]),
    "memory batch": (lambda b: b(h(B=2), b.encode_visual(vis(B=1))), ValueError,
                     ["visual", "batch", "1", "2"]),
    "memory dtype": (lambda b: b(h(dtype=torch.float64), b.encode_visual(vis())), TypeError,
                     ["VisualMemory", "float32", "float64"]),
    "memory of another block": (
        lambda b: b(h(), FusedPVM(PVMConfig(hidden_size=D, num_attention_heads=4,
                                            num_key_value_heads=4, head_dim=16,
                                            intermediate_size=128, pvm_hidden_size=32)
                                  ).encode_visual(vis())),
        ValueError, ["VisualMemory", "(2, 16)", "(1, 16)"]),
    "backend name": (lambda b: b(h(), vis(), backend="fastest"), ValueError,
                     ["backend='fastest'", "known backends"]),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_fused_pvm_rejects_bad_arguments_before_any_kernel(block, case):
    call, exc, fragments = BLOCK_CASES[case]
    kwargs_backend = "spy"

    def spied(*args, **kwargs):
        kwargs.setdefault("backend", kwargs_backend)
        return block(*args, **kwargs)
    spied.encode_visual = block.encode_visual
    with pytest.raises(exc) as info:
        call(spied)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


ENCODE_CASES = {
    "rank": (lambda b: b.encode_visual(torch.randn(5, D)), ValueError, ["visual", "(5, 64)"]),
    "type": (lambda b: b.encode_visual(None), TypeError, ["visual", "NoneType"]),
    "mask dtype": (lambda b: b.encode_visual(vis(), torch.ones(2, 5)), TypeError,
                   ["visual_mask", "torch.bool", "float32"]),
    "mask shape": (lambda b: b.encode_visual(vis(), torch.ones(5, dtype=torch.bool)), ValueError,
                   ["visual_mask", "(2, 5)", "(5,)"]),
    "int visual": (lambda b: b.encode_visual(vis().int()), TypeError, ["visual", "int32"]),
}


@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_encode_visual_rejects_bad_arguments(block, case):
    call, exc, fragments = ENCODE_CASES[case]
    with pytest.raises(exc) as info:
        call(block)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def q_(B=2, T=3, H=2, hd=16, **kw):
    return torch.randn(B, T, H, hd, **kw)


def kv(B=2, Nv=5, Hkv=1, hd=16, **kw):
    return torch.randn(B, Nv, Hkv, hd, **kw)


OP_CASES = {
    "q rank": (lambda: pvm_retrieval(torch.randn(2, 3, 16), kv(), kv()), ValueError, ["q", "[B, T, H, hd]", "(2, 3, 16)"]),
    "q type": (lambda: pvm_retrieval(None, kv(), kv()), TypeError, ["q", "NoneType"]),
    "k batch": (lambda: pvm_retrieval(q_(), kv(B=3), kv()), ValueError, ["k", "(2, 5, 1, 16)", "(3, 5, 1, 16)"]),
    "k hd": (lambda: pvm_retrieval(q_(), kv(hd=8), kv()), ValueError, ["k", "(2, 5, 1, 16)"]),
    "v shape": (lambda: pvm_retrieval(q_(), kv(), kv(Nv=4)), ValueError, ["v", "(2, 5, 1, 16)", "(2, 4, 1, 16)"]),
    "v type": (lambda: pvm_retrieval(q_(), kv(), [1.0]), TypeError, ["v", "list"]),
    "v dtype": (lambda: pvm_retrieval(q_(), kv(), kv(dtype=torch.float64)), TypeError, ["v", "float32", "float64"]),
    "k device": (lambda: pvm_retrieval(q_(), kv(device=META), kv()), ValueError, ["k", "meta", "cpu"]),
    "gqa": (lambda: pvm_retrieval(q_(H=3), kv(Hkv=2), kv(Hkv=2)), ValueError, ["H=3", "Hkv=2"]),
    "mask dtype": (lambda: pvm_retrieval(q_(), kv(), kv(), torch.ones(2, 5)), TypeError,
                   ["key_mask", "torch.bool", "float32"]),
    "mask shape": (lambda: pvm_retrieval(q_(), kv(), kv(), torch.ones(2, 6, dtype=torch.bool)), ValueError,
                   ["key_mask", "(2, 5)", "(2, 6)"]),
    "kv_len dtype": (lambda: pvm_retrieval(q_(), kv(), kv(), None, torch.full((2,), 5)), TypeError,
                     ["kv_len", "torch.int32", "int64"]),
    "kv_len shape": (lambda: pvm_retrieval(q_(), kv(), kv(), None, torch.full((3,), 5, dtype=torch.int32)),
                     ValueError, ["kv_len", "(2,)", "(3,)"]),
    "merge type": (lambda: pvm_merge("x", torch.ones(1)), TypeError, ["expanded", "str"]),
    "merge int": (lambda: pvm_merge(torch.ones(2, 4, dtype=torch.int32), torch.ones(1)), TypeError,
                  ["expanded", "int32"]),
    "gate shape": (lambda: pvm_merge(torch.randn(2, 4), torch.ones(2)), ValueError, ["gate", "(1,)", "(2,)"]),
    "gate type": (lambda: pvm_merge(torch.randn(2, 4), 1.0), TypeError, ["gate", "float"]),
    "keep shape": (lambda: pvm_merge(torch.randn(2, 4), torch.ones(1), torch.ones(3, dtype=torch.bool)),
                   ValueError, ["keep", "(2,)", "(3,)"]),
    "keep dtype": (lambda: pvm_merge(torch.randn(2, 4), torch.ones(1), torch.ones(2)), TypeError,
                   ["keep", "torch.bool", "float32"]),
    "ffn dtype": (lambda: pvm_merge(torch.randn(2, 4), torch.ones(1), None, torch.randn(2, 4).double()),
                  TypeError, ["ffn_output", "float32", "float64"]),
    "ffn device": (lambda: pvm_merge(torch.randn(2, 4), torch.ones(1), None, torch.randn(2, 4, device=META)),
                   ValueError, ["ffn_output", "meta"]),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_functional_ops_reject_bad_arguments_before_any_kernel(case, monkeypatch):
    import pvm_kernels.ops.functional as functional
    call, exc, fragments = OP_CASES[case]
    real = functional.resolve_backend
    monkeypatch.setattr(functional, "resolve_backend", lambda name, device: real("spy", device))
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("field,value,fragments", [
    ("pvm_hidden_size", 40, ["pvm_hidden_size", "head_dim=16", "40"]),
    ("pvm_hidden_size", 0, ["pvm_hidden_size"]),
    ("num_key_value_heads", 3, ["num_attention_heads=4", "3"]),
])
def test_bad_config_names_the_field(field, value, fragments):
    kwargs = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, pvm_hidden_size=32)
    kwargs[field] = value
    with pytest.raises(ValueError) as info:
        FusedPVM(PVMConfig(**kwargs))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_a_decode_step_never_syncs_with_the_host(block):
    """Validation of a decode step compares metadata only: no .item()/bool(tensor) (which
    would stall a GPU stream every token). Checked by recording every aten op it runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        memory = block.encode_visual(vis(), mask)
        step = h(T=1)
        for backend in ("reference", "cpu"):
            with Syncs() as mode:
                block(step, memory, backend=backend)
            assert mode.ops, "the dispatch mode saw nothing: the check would prove nothing"
            assert not [op for op in mode.ops if "_local_scalar_dense" in op or "nonzero" in op], \
                (backend, mode.ops)
