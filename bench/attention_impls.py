"""The retrieval as F.scaled_dot_product_attention and FlexAttention compute it, the checks
that they compute what ours computes, and the FLOP / byte counts every timing is judged by.

Shared by ``bench/test_bench_attention.py`` (pytest-benchmark), ``bench/gpu_evidence.py``
(the one-process GPU evidence run) and ``tests/test_bench_attention.py`` (the CPU checks of
these set-ups against ``pvm_kernels.reference``).

Layouts: ours takes q [B, T, H, hd] and k, v [B, Nv, Hkv, hd]; SDPA and FlexAttention take
[B, heads, S, hd]. Here they get transpose views of the same tensors (no copy) and
``enable_gqa=True`` (no K/V expanded to H heads): query head i reads KV head
i // (H / Hkv), as ours does. The softmax scale is 1/sqrt(hd) everywhere (both libraries'
default), attention is non-causal, and ``kv_len`` [B] int32 (keys at index >= kv_len[b] of
sample b are ignored) becomes a FlexAttention block mask or an SDPA boolean ``attn_mask``.

What each library does with a row that has no valid key (kv_len 0): ours and the reference
give an output of 0; FlexAttention gives an output of 0 and an lse of -inf; the SDPA math
backend gives 0 (tests/test_bench_attention.py checks all three on CPU).
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from pvm_kernels.roofline import Cost, retrieval_cost

#: The 8B layout of the retrieval: query heads, KV heads, head dim.
H, HKV, HD = 4, 1, 128

#: The implementations compared: ours (two backends, and triton with its sm_90 tensor
#: descriptors switched off: "pvm-triton-pointer", what the TMA path gains), SDPA's cuDNN
#: and flash kernels, compiled FlexAttention.
IMPLEMENTATIONS = ("pvm-triton", "pvm-triton-pointer", "pvm-cuda", "sdpa-cudnn", "sdpa-flash",
                   "flex")


def implementation_context(name: str):
    """The context a run of implementation ``name`` (forward and backward) must be inside:
    pointer loads forced for "pvm-triton-pointer" (retrieval.tensor_descriptors(False),
    read at each launch, so the backward needs it too); nothing for the others."""
    import contextlib
    if name == "pvm-triton-pointer":
        from pvm_kernels.triton_ops.retrieval import tensor_descriptors
        return tensor_descriptors(False)
    return contextlib.nullcontext()

#: Largest |got - want| allowed, as a fraction of max |want|, before a timing is trusted.
TOLERANCE = 2e-2


@dataclass(frozen=True)
class AttentionCase:
    """One benchmark shape: batch B, query tokens T, visual tokens Nv, and per-sample valid
    key counts ``kv_len`` (None: every sample has all Nv keys)."""

    B: int
    T: int
    Nv: int
    kv_len: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.kv_len is not None and len(self.kv_len) != self.B:
            raise ValueError(f"kv_len has {len(self.kv_len)} entries for B={self.B}")

    @property
    def id(self) -> str:
        tail = "" if self.kv_len is None else "-kvlen" + "_".join(map(str, self.kv_len))
        return f"B{self.B}-T{self.T}-Nv{self.Nv}{tail}"

    def lengths(self) -> List[int]:
        """Valid keys per sample, clamped to [0, Nv] as the kernels clamp kv_len."""
        raw = self.kv_len if self.kv_len is not None else (self.Nv,) * self.B
        return [min(max(int(n), 0), self.Nv) for n in raw]

    def kv_len_tensor(self, device) -> torch.Tensor:
        """kv_len as ours and the masks take it: [B] int32 on ``device`` (all Nv when the
        case has no kv_len)."""
        return torch.tensor(self.lengths(), dtype=torch.int32, device=device)

    def cost(self, elem: int, backward: bool = False) -> Cost:
        """The call's counts (``retrieval_kv_len_cost``): the forward, or the forward plus
        the backward (``backward=True``, what a forward+backward timing does)."""
        fwd = retrieval_kv_len_cost(self.T, self.lengths(), self.Nv, elem)
        if not backward:
            return fwd
        return fwd + retrieval_kv_len_cost(self.T, self.lengths(), self.Nv, elem, backward=True)


#: The benchmark shapes (8B layout, bf16 on a GPU): two prefill shapes with every key
#: valid and a batch of 4 whose samples have 2048, 1500, 1024 and 700 valid keys of 2048.
CASES = (AttentionCase(1, 8192, 2048), AttentionCase(1, 16384, 4096),
         AttentionCase(4, 2048, 2048, (2048, 1500, 1024, 700)))


def retrieval_kv_len_cost(T: int, kv_lens: Sequence[int], Nv: int, elem: int,
                          backward: bool = False, heads: int = H, kv_heads: int = HKV,
                          head_dim: int = HD) -> Cost:
    """``pvm_kernels.roofline.retrieval_cost`` summed over the samples of a batch, each with
    its own valid keys min(max(kv_len[b], 0), Nv): the useful work and the fewest bytes
    (forward 4 T H n hd flops per sample with n valid keys, backward 10 T H n hd, i.e.
    2.5x; only valid keys are read). A sample with no valid key costs no flops, only its
    q / out (/ dO, dq) rows."""
    total = Cost(0.0, 0)
    for n in kv_lens:
        n = min(max(int(n), 0), Nv)
        total = total + retrieval_cost(1, T, heads, kv_heads, head_dim, n, elem, backward)
    return total


# ---- what cannot run here, and why ---------------------------------------------------------

def unavailable_reason(name: str, device: torch.device, case: AttentionCase) -> Optional[str]:
    """Why implementation ``name`` is not timed on ``device`` for ``case`` (None: it is).

    GPU-only: everything here; the CPU run records the FLOP / byte counts only. SDPA's flash
    kernel takes no attn_mask, so a case with kv_len is ours, FlexAttention and cuDNN (with a
    boolean mask) only."""
    from pvm_kernels import backend_status
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; known: {IMPLEMENTATIONS}")
    if name.startswith("pvm-"):
        backend = name[4:].removesuffix("-pointer")
        why = backend_status(device).get(backend)
        if why is not None:
            return f"our {backend} backend cannot run here: {why}"
        if device.type != "cuda":
            return ("our kernels are compared on a CUDA GPU only (Triton's CPU interpreter "
                    "times numpy, not a kernel)")
        if name.endswith("-pointer") and torch.cuda.get_device_capability(device)[0] < 9:
            return "below sm_90 the triton retrieval always uses pointer loads (no TMA)"
        return None
    if device.type != "cuda":
        if name.startswith("sdpa-"):
            return (f"SDPA's {name[5:]} kernel runs on CUDA GPUs only (CPU SDPA is the math "
                    "backend, not what is compared)")
        return ("compiled FlexAttention is compared on a CUDA GPU only (on CPU compiled flex "
                "returns no lse and has no backward; eager flex is unfused)")
    if name == "sdpa-flash" and case.kv_len is not None:
        return ("SDPA's flash kernel takes no attn_mask: the kv_len case compares ours, "
                "FlexAttention (block mask) and cuDNN (boolean attn_mask) only")
    return None


# ---- SDPA --------------------------------------------------------------------------------

def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if name not in kernels:
        raise ValueError(f"unknown SDPA kernel {name!r}; known: {sorted(kernels)}")
    return kernels[name]


def kv_len_key_mask(kv_len: torch.Tensor, Nv: int) -> torch.Tensor:
    """[B, Nv] bool, True where the key index is below kv_len[b] (kv_len [B] int)."""
    return torch.arange(Nv, device=kv_len.device)[None, :] < kv_len[:, None].to(torch.long)


def make_sdpa(kernel: str, kv_len: Optional[torch.Tensor] = None,
              Nv: Optional[int] = None) -> Callable:
    """F.scaled_dot_product_attention restricted to one kernel (``kernel``: "cudnn", "flash",
    "math" or "efficient"), with enable_gqa=True and, when ``kv_len`` [B] int32 is given, a
    boolean attn_mask [B, 1, 1, Nv] built here once (outside any timing).

    Returns fn(q, k, v) -> (out, None): q [B, T, H, hd], k, v [B, Nv, Hkv, hd] in ours'
    layout (passed to SDPA as transpose views), out [B, T, H, hd] (a transpose view) in
    q.dtype. Raises RuntimeError when the kernel refuses the inputs (``sdpa_refusal`` turns
    that into a reason)."""
    backend = _sdpa_backend(kernel)
    mask = None
    if kv_len is not None:
        if Nv is None:
            raise ValueError("make_sdpa: Nv is required with kv_len")
        mask = kv_len_key_mask(kv_len, Nv)[:, None, None, :]

    def fn(q, k, v):
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), attn_mask=mask,
                                                 enable_gqa=True)
        return out.transpose(1, 2), None
    return fn


#: SDPA's words when no enabled kernel takes the inputs: CUDA, CPU.
_SDPA_REFUSALS = ("No available kernel", "No viable backend for scaled_dot_product_attention")


def sdpa_refusal(fn: Callable, *args) -> Tuple[Optional[str], object]:
    """Call fn(*args); (None, result) when it runs, (reason, None) when SDPA has no enabled
    kernel for the inputs (its RuntimeError "No available kernel" on CUDA, "No viable
    backend" on CPU, with the warnings that say why). Any other error propagates."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return None, fn(*args)
        except RuntimeError as exc:
            if not any(m in str(exc) for m in _SDPA_REFUSALS):
                raise
            why = "; ".join(str(w.message).strip() for w in caught) or str(exc)
            return (f"SDPA refused these inputs on torch {torch.__version__}: {why}"[:1500],
                    None)


# ---- FlexAttention -----------------------------------------------------------------------

def _flex_lse_style() -> str:
    """"aux" where flex_attention takes return_aux=AuxRequest(lse=True) (torch >= 2.9;
    return_lse is deprecated there), else "lse" (return_lse=True, older torch)."""
    from torch.nn.attention import flex_attention as fa
    params = inspect.signature(fa.flex_attention).parameters
    return "aux" if "return_aux" in params and hasattr(fa, "AuxRequest") else "lse"


def _flex_with_aux(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention
    out, aux = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                              return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _flex_with_lse(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)


_COMPILED = {}


def _flex_callable(compiled: bool) -> Callable:
    raw = _flex_with_aux if _flex_lse_style() == "aux" else _flex_with_lse
    if not compiled:
        return raw
    if "fn" not in _COMPILED:
        import torch._dynamo
        # One static graph per shape and grad mode (a kv_len block mask is a new closure
        # each time): raise the recompile limit so no case falls back to eager flex.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        # fullgraph: a graph break would run flex eagerly (unfused) and time the wrong thing.
        _COMPILED["fn"] = torch.compile(raw, dynamic=False, fullgraph=True)
    return _COMPILED["fn"]


def flex_block_mask(kv_len: torch.Tensor, T: int, Nv: int):
    """FlexAttention BlockMask of the retrieval: every query of sample b sees keys
    kv_idx < kv_len[b] (kv_len [B] int32 on the inputs' device), for all heads; built with
    create_block_mask (once, outside any timing)."""
    from torch.nn.attention.flex_attention import create_block_mask
    lens = kv_len.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]
    return create_block_mask(mask_mod, lens.shape[0], None, T, Nv, device=lens.device)


def make_flex(kv_len: torch.Tensor, T: int, Nv: int, compiled: bool = True) -> Callable:
    """flex_attention with enable_gqa=True, a block mask from ``kv_len`` [B] int32 and the
    lse returned (return_aux=AuxRequest(lse=True) or return_lse=True, whichever this torch
    has); compiled with torch.compile(dynamic=False, fullgraph=True) when ``compiled``
    (the fused kernel; eager flex is an unfused reference that has no CPU backward).

    Returns fn(q, k, v) -> (out [B, T, H, hd] in q.dtype, lse [B, H, T] float32 (float64
    for float64 inputs), natural log; -inf on a row with no valid key), q [B, T, H, hd],
    k, v [B, Nv, Hkv, hd] in ours' layout (passed as transpose views)."""
    block_mask = flex_block_mask(kv_len, T, Nv)
    call = _flex_callable(compiled)

    def fn(q, k, v):
        out, lse = call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask)
        return out.transpose(1, 2), lse
    return fn


# ---- ours ---------------------------------------------------------------------------------

def make_ours(backend: str, kv_len: Optional[torch.Tensor] = None) -> Callable:
    """pvm_retrieval on ``backend`` with ``kv_len`` [B] int32 or None; fn(q, k, v) ->
    (out [B, T, H, hd], None)."""
    from pvm_kernels import pvm_retrieval

    def fn(q, k, v):
        return pvm_retrieval(q, k, v, None, kv_len, backend=backend), None
    return fn


def make_implementation(name: str, case: AttentionCase, device: torch.device) -> Callable:
    """fn(q, k, v) -> (out, lse or None) of implementation ``name`` (IMPLEMENTATIONS) for
    ``case``: ours with kv_len only where the case has one, SDPA with a mask only where the
    case has one, FlexAttention always with a kv_len block mask (all blocks full when every
    key is valid)."""
    kv_len = case.kv_len_tensor(device)
    masked = case.kv_len is not None
    if name.startswith("pvm-"):  # -pointer: run it inside implementation_context(name)
        return make_ours(name[4:].removesuffix("-pointer"), kv_len if masked else None)
    if name.startswith("sdpa-"):
        return make_sdpa(name[5:], kv_len if masked else None, case.Nv)
    if name == "flex":
        return make_flex(kv_len, case.T, case.Nv, compiled=True)
    raise ValueError(f"unknown implementation {name!r}; known: {IMPLEMENTATIONS}")


# ---- checks -------------------------------------------------------------------------------

def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float32 (inf on any NaN / inf mismatch or a shape
    mismatch; an all-zero ``want`` divides by 1)."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    g, w = got.float(), want.float()
    diff = (g - w).abs()
    if not torch.isfinite(diff).all():
        return math.inf
    denom = float(w.abs().max())
    return float(diff.max()) / (denom if denom > 0 else 1.0)


def assert_matches(name: str, what: str, got: torch.Tensor, want: torch.Tensor,
                   tol: float = TOLERANCE) -> float:
    """AssertionError naming ``name`` and ``what`` unless relative_error(got, want) <= tol;
    returns the error (recorded next to the timing)."""
    err = relative_error(got, want)
    if not err <= tol:
        raise AssertionError(f"{name}: {what} differs from ours: max |diff| / max |ours| = "
                             f"{err:.3g} > {tol:g} (shapes {tuple(got.shape)} vs "
                             f"{tuple(want.shape)}); the timing would not be apples to apples")
    return err


def reference_lse(q: torch.Tensor, k: torch.Tensor, kv_len: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> torch.Tensor:
    """logsumexp over valid keys of the scaled scores, per query row and head: q [B, T, H, hd],
    k [B, Nv, Hkv, hd] (query head i reads KV head i // (H / Hkv)), kv_len [B] or None.
    Returns [B, H, T] in float32 (float64 for float64 q); -inf where a row has no valid key.
    Materialises the scores: a check, not a kernel."""
    acc = torch.promote_types(q.dtype, torch.float32)
    Hq, hd = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    kx = k.to(acc).repeat_interleave(Hq // k.shape[2], dim=2)
    s = torch.einsum("bthd,bnhd->bhtn", q.to(acc), kx) * scale
    if kv_len is not None:
        valid = kv_len_key_mask(kv_len, k.shape[1])[:, None, None, :]
        s = s.masked_fill(~valid, -math.inf)
    return torch.logsumexp(s, dim=-1)


def assert_lse_matches(name: str, lse: torch.Tensor, want: torch.Tensor,
                       atol: float = TOLERANCE) -> float:
    """AssertionError unless ``lse`` [B, H, T] is -inf exactly where ``want`` is (rows with no
    valid key) and within ``atol`` (absolute, natural log) elsewhere; returns the max error."""
    empty = torch.isneginf(want)
    if lse.shape != want.shape or not torch.equal(torch.isneginf(lse), empty):
        raise AssertionError(f"{name}: lse is not -inf exactly on the rows with no valid key "
                             f"(shapes {tuple(lse.shape)} vs {tuple(want.shape)})")
    diff = (lse.float() - want.float()).abs()[~empty]
    err = float(diff.max()) if diff.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"{name}: lse differs from the reference by {err:.3g} > {atol:g}")
    return err
