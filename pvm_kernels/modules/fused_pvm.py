"""FusedPVM: the PVM block as an nn.Module with the published parameter names."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PVMDims
from ..memory import PackedVisualMemory, VisualMemory
from ..ops import check_backend_dtype, check_backend_head_dim, resolve_backend
from ..ops.varlen import check_cu_seqlens, pvm_retrieval_varlen, validate_cu_seqlens
from ..ops.checks import check_device, check_embeddings, check_like
from ..reference import retrieval_probabilities, rms_norm
from .paired_linear import can_pair, paired_linear, stack_weights


def plain(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is exactly a ``cls`` with no hook: a fused path may then read its
    parameters instead of calling it. A module a tool wrapped (PEFT's LoRA layers, FSDP2's
    sharded class, a parametrization) or hooked is called as it is, so the tool acts."""
    return (type(module) is cls and not module._forward_hooks
            and not module._forward_pre_hooks and not _GLOBAL_HOOKS[0]
            and not _GLOBAL_HOOKS[1])


# torch.nn's global forward hooks (register_module_forward_hook), which apply to every module
_GLOBAL_HOOKS = (torch.nn.modules.module._global_forward_hooks,
                 torch.nn.modules.module._global_forward_pre_hooks)


class PVMRMSNorm(nn.Module):
    """RMSNorm with a gain (Qwen convention: float32 statistics, cast, then the gain)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class PVMCrossAttention(nn.Module):
    """Projections and per-head norms of the text-to-visual cross-attention (no RoPE)."""

    def __init__(self, dims: PVMDims):
        super().__init__()
        P, hd = dims.pvm_hidden_size, dims.head_dim
        bias = dims.attention_bias
        self.q_proj = nn.Linear(P, dims.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(P, dims.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(P, dims.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(dims.num_heads * hd, P, bias=bias)
        self.q_norm = PVMRMSNorm(hd, dims.eps)
        self.k_norm = PVMRMSNorm(hd, dims.eps)


class PVMMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) of width I."""

    def __init__(self, dims: PVMDims):
        super().__init__()
        P, inter = dims.pvm_hidden_size, dims.intermediate_size
        self.gate_proj = nn.Linear(P, inter, bias=False)
        self.up_proj = nn.Linear(P, inter, bias=False)
        self.down_proj = nn.Linear(inter, P, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedPVM(nn.Module):
    """Persistent Visual Memory block (spec: ``docs/spec.md``), parallel to a decoder FFN.

    ``FusedPVM(config)`` takes any object with ``hidden_size, num_attention_heads,
    num_key_value_heads, head_dim, intermediate_size, rms_norm_eps, pvm_hidden_size``
    (optionally ``attention_bias``, ``initializer_range``), e.g. ``PVMConfig`` or a
    transformers Qwen3-VL text config. Parameter names and shapes are the published ones,
    so ``load_state_dict(block_state, strict=True)`` loads a released checkpoint.

    At construction ``gate_alpha = 0``: the block is exactly inert until trained.
    """

    def __init__(self, config: Any):
        super().__init__()
        dims = PVMDims.from_config(config)
        self.dims = dims
        D, P = dims.hidden_size, dims.pvm_hidden_size
        self.text_reducer = nn.Linear(D, P, bias=False)
        self.vision_reducer = nn.Linear(D, P, bias=False)
        self.output_expander = nn.Linear(P, D, bias=False)
        self.input_norm = PVMRMSNorm(P, dims.eps)
        self.post_attn_norm = PVMRMSNorm(P, dims.eps)
        self.cross_attn = PVMCrossAttention(dims)
        self.mlp = PVMMLP(dims)
        self.gate_alpha = nn.Parameter(torch.zeros(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spec initialisation: Linear ~ N(0, initializer_range), biases 0, gains 1, gate 0.

        The output expander is *not* zeroed: with the gate at 0 as well, every PVM gradient
        would be 0 and training could never start.
        """
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, self.dims.initializer_range)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, PVMRMSNorm):
                mod.weight.fill_(1.0)
        self.gate_alpha.zero_()

    def extra_repr(self) -> str:
        d = self.dims
        return (f"D={d.hidden_size}, P={d.pvm_hidden_size}, H={d.num_heads}, "
                f"Hkv={d.num_kv_heads}, hd={d.head_dim}, I={d.intermediate_size}")

    # ---- visual side -----------------------------------------------------------------------

    def encode_visual(self, visual: torch.Tensor,
                      visual_mask: Optional[torch.Tensor] = None,
                      backend: Optional[str] = None) -> VisualMemory:
        """Project visual embeddings once: vision_reducer, k/v projections and k-norm.

        visual [B, Nv, D] (dtype of the block's input); visual_mask [B, Nv] bool, True =
        valid token, or None (all valid). Masked tokens are zeroed before projection so
        padding can hold anything, NaN included. backend: whose fused glue runs the k-norm
        (None: the fastest for the device). Returns a VisualMemory to pass as ``visual`` to
        later calls (every decode step), which then only do the query side.
        """
        check_embeddings("visual", visual, self.dims.hidden_size, "Nv")
        impl = resolve_backend(backend, visual.device)
        # k and v stacked (one GEMM) only where a backward follows: without one, the cat
        # costs the launch it saves
        stacks = self._stacks(impl, visual, kv=torch.is_grad_enabled(), gate_up=False)
        return self._encode(visual, visual_mask, impl, stacks)

    def _encode(self, visual: torch.Tensor, visual_mask: Optional[torch.Tensor], impl,
                stacks: Dict[str, torch.Tensor]) -> VisualMemory:
        """encode_visual on a resolved backend, with k/v stacked where ``stacks`` has
        "kv" (``_stacks``)."""
        d, attn = self.dims, self.cross_attn
        B, Nv, _ = visual.shape
        if visual_mask is not None:
            check_like("visual_mask", visual_mask, (B, Nv), visual.device, torch.bool, "visual")
            visual = torch.where(visual_mask[..., None], visual, 0.0)
        norm = attn.k_norm
        heads = (B, Nv, d.num_kv_heads, d.head_dim)
        k, v = self._kv_projections(self.vision_reducer(visual), stacks)
        k, v = k.view(heads), v.view(heads)
        if impl.visual_kv is None or not plain(norm, PVMRMSNorm) or \
                norm.weight.dtype != k.dtype or k.dtype not in impl.dtypes:
            return VisualMemory.from_kv(self._norm(impl, norm, k), v, visual_mask)
        # k_norm and the memory's kv_len / has_visual in one launch
        key, kv_len, has_visual = impl.visual_kv(k, norm.weight, visual_mask, norm.eps)
        return VisualMemory(key, v, visual_mask, kv_len, has_visual)

    def _stacks(self, impl, x: torch.Tensor, kv: bool, gate_up: bool
                ) -> Dict[str, torch.Tensor]:
        """The stacked weights ([k; v] as "kv", [gate; up] as "gate_up") of the pairs asked
        for that can be paired (plain modules, ``can_pair``, a backend that stacks), made
        in one launch for all of them (modules/paired_linear.py); x: the block's input
        (dtype and device)."""
        if not (kv or gate_up):  # a decode step with a memory: nothing to stack, at once
            return {}
        attn, mlp = self.cross_attn, self.mlp
        pairs = []
        # Under autocast the GEMMs' inputs are not x's dtype, and a custom backward runs
        # outside autocast: the modules run as written.
        if impl.stacked_projections and not torch.is_autocast_enabled(x.device.type):
            if kv:
                pairs.append(("kv", attn.k_proj, attn.v_proj))
            if gate_up and plain(mlp, PVMMLP):
                pairs.append(("gate_up", mlp.gate_proj, mlp.up_proj))
        pairs = [(name, a, b) for name, a, b in pairs
                 if plain(a, nn.Linear) and plain(b, nn.Linear)
                 and can_pair(a, b, x.dtype, x.device)]
        if not pairs:
            return {}
        stacked = stack_weights(*[m for _, a, b in pairs for m in (a, b)])
        out, row = {}, 0
        for name, a, b in pairs:
            rows = a.weight.shape[0] + b.weight.shape[0]
            out[name] = stacked[row:row + rows]
            row += rows
        return out

    def _kv_projections(self, y: torch.Tensor, stacks: Dict[str, torch.Tensor]):
        """(k_proj(y), v_proj(y)) [..., Hkv * hd] of the reduced visual tokens y [..., P]:
        one GEMM where ``stacks`` has "kv"."""
        attn = self.cross_attn
        if "kv" in stacks:
            return paired_linear(y, attn.k_proj, attn.v_proj, stacks["kv"])
        return attn.k_proj(y), attn.v_proj(y)

    @staticmethod
    def _norm(impl, norm: PVMRMSNorm, x: torch.Tensor) -> torch.Tensor:
        """``norm(x)``, through the backend's fused RMSNorm where it has one and the module
        is plain (``plain``) and in x's dtype."""
        if impl is not None and impl.rms_norm is not None and plain(norm, PVMRMSNorm) \
                and norm.weight.dtype == x.dtype and x.dtype in impl.dtypes:
            return impl.rms_norm(x, norm.weight, norm.eps)
        return norm(x)

    def _keys_values(self, visual: torch.Tensor, impl, stacks: Dict[str, torch.Tensor]):
        """(k, v) [..., Hkv, hd] of visual [..., D] (padded or packed): vision_reducer, the
        k / v projections (stacked where ``stacks`` has "kv") and the per-head k-norm (the
        backend's glue)."""
        d, attn = self.dims, self.cross_attn
        heads = (*visual.shape[:-1], d.num_kv_heads, d.head_dim)
        k, v = self._kv_projections(self.vision_reducer(visual), stacks)
        return self._norm(impl, attn.k_norm, k.view(heads)), v.view(heads)

    def visual_keys_values(self, visual: torch.Tensor, backend: Optional[str] = None):
        """(k, v) [..., Hkv, hd] of visual embeddings [..., D] in any layout (a serving
        engine's packed step): the keys k-normed, what retrieval reads. No mask: every row
        is projected."""
        check_embeddings("visual", visual.reshape(1, -1, visual.shape[-1]),
                         self.dims.hidden_size, "Nv")
        return self._keys_values(visual, resolve_backend(backend, visual.device), {})

    def queries(self, hidden_states: torch.Tensor, backend: Optional[str] = None
                ) -> torch.Tensor:
        """q [..., H, hd] (q-normed, what retrieval takes) of hidden_states [..., D]: for a
        caller that runs the retrieval itself (a serving engine's paged cache), then
        ``update_from_retrieval``."""
        check_embeddings("hidden_states",
                         hidden_states.reshape(1, -1, hidden_states.shape[-1]),
                         self.dims.hidden_size, "T")
        return self._queries(hidden_states, resolve_backend(backend, hidden_states.device))

    def update_from_retrieval(self, a: torch.Tensor, keep: Optional[torch.Tensor] = None,
                              backend: Optional[str] = None) -> torch.Tensor:
        """The PVM update u [..., D] from the retrieval's output a [..., H, hd]: o_proj,
        the inner MLP, the expander and the gated merge. keep [...] bool: u is exactly 0
        where False (a query without visual tokens, or itself visual); None keeps all."""
        d = self.dims
        if a.shape[-2:] != (d.num_heads, d.head_dim):
            raise ValueError(f"a must be [..., {d.num_heads}, {d.head_dim}], got "
                             f"{tuple(a.shape)}")
        check_like("keep", keep, a.shape[:-2], a.device, torch.bool, "a")
        return self._update(resolve_backend(backend, a.device), a, keep, None, {})

    def _queries(self, hidden_states: torch.Tensor, impl=None,
                 raw: bool = False) -> torch.Tensor:
        """q [..., H, hd] of hidden_states [..., D]: text_reducer, input_norm, q_proj and the
        per-head q-norm (the backend's glue where ``impl``); ``raw``: without the q-norm
        (the retrieval kernels apply it)."""
        d, attn = self.dims, self.cross_attn
        x = self._norm(impl, self.input_norm, self.text_reducer(hidden_states))
        q = attn.q_proj(x).view(*hidden_states.shape[:-1], d.num_heads, d.head_dim)
        return q if raw else self._norm(impl, attn.q_norm, q)

    def _fused_q_norm(self, impl, varlen: bool, dtype: torch.dtype) -> bool:
        """Whether ``impl``'s retrieval applies q_norm itself to q_proj's output of ``dtype``
        (a plain module with its gain in that dtype: under autocast q is the autocast dtype
        and an fp32 gain is applied by the module)."""
        fused = impl.retrieval_varlen_qnorm if varlen else impl.retrieval_qnorm
        norm = self.cross_attn.q_norm
        return fused is not None and plain(norm, PVMRMSNorm) and norm.weight.dtype == dtype

    def _mlp_residual(self, impl, m: torch.Tensor, stacks: Dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        """``m + mlp(post_attn_norm(m))``: the norm and SwiGLU through the backend's fused
        ops, gate and up as one GEMM where ``stacks`` has "gate_up", the residual add
        folded into the down projection (one addmm), and, where a backward follows and the
        backend has it, only the MLP's input saved for it (ops/recompute.py); each where the
        modules are plain."""
        n = self._norm(impl, self.post_attn_norm, m)
        mlp = self.mlp
        if not impl.stacked_projections or not plain(mlp, PVMMLP):
            return m + mlp(n)
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        down_plain = plain(down, nn.Linear) and down.bias is None and \
            down.weight.dtype == n.dtype
        if impl.mlp_residual is not None and down_plain and "gate_up" in stacks and \
                torch.is_grad_enabled():
            return impl.mlp_residual(m, n, gate.weight, up.weight, down.weight,
                                     stacks["gate_up"])
        if "gate_up" in stacks:
            g, u = paired_linear(n, gate, up, stacks["gate_up"])
        else:
            g, u = gate(n), up(n)
        s = impl.swiglu(g, u) if impl.swiglu is not None else F.silu(g) * u
        if not down_plain:
            return m + down(s)
        return torch.addmm(m.reshape(-1, m.shape[-1]), s.reshape(-1, s.shape[-1]),
                           down.weight.t()).view(m.shape)

    def _update(self, impl, a: torch.Tensor, keep: Optional[torch.Tensor],
                ffn_output: Optional[torch.Tensor], stacks: Dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """From the retrieval a [..., H, hd]: o_proj, the inner MLP, the expander and the
        merge (keep / ffn_output as pvm_merge takes them); the expansion recomputed in
        backward rather than saved where the backend has ``expand_merge``."""
        d = self.dims
        m = self.cross_attn.o_proj(a.reshape(*a.shape[:-2], d.num_heads * d.head_dim))
        m = self._mlp_residual(impl, m, stacks)
        expander = self.output_expander
        if impl.expand_merge is not None and plain(expander, nn.Linear) and \
                expander.bias is None and expander.weight.dtype == m.dtype and \
                not torch.compiler.is_compiling() and \
                not torch.is_autocast_enabled(m.device.type):
            return impl.expand_merge(m, expander.weight, self.gate_alpha, keep, ffn_output,
                                     d.eps)
        return impl.merge(expander(m), self.gate_alpha, keep, ffn_output, d.eps)

    @torch.no_grad()
    def visual_attention(self, hidden_states: torch.Tensor, memory: VisualMemory) -> torch.Tensor:
        """The retrieval's attention weights, for analysis: [B, H, T, Nv] float32.

        hidden_states [B, T, D]; memory from ``encode_visual``. Each row sums to 1 over the
        sample's valid visual tokens (0 for a sample without any): PVM's softmax is normalised
        over the image alone, whatever the text length. Plain PyTorch, not a kernel.
        """
        return retrieval_probabilities(self._queries(hidden_states), memory.key, memory.key_mask,
                                       1.0 / math.sqrt(self.dims.head_dim))

    # ---- forward -------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor,
                visual: Union[torch.Tensor, VisualMemory, None],
                visual_mask: Optional[torch.Tensor] = None,
                query_is_visual: Optional[torch.Tensor] = None,
                ffn_output: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> torch.Tensor:
        """The PVM update ``u`` [B, T, D], or ``ffn_output + u`` when ffn_output is given.

        hidden_states [B, T, D]: the residual stream entering post_attention_layernorm.
        visual: [B, Nv, D] visual embeddings, a VisualMemory from ``encode_visual``, or
        None for a text-only call (returns zeros, or ffn_output itself, without any work).
        visual_mask [B, Nv] bool (only with raw embeddings; a memory carries its own).
        query_is_visual [B, T] bool: the update is 0 at those positions.
        ffn_output [B, T, D]: fused into the output by the merge kernel.
        backend: "reference", "triton", ... or None for the fastest on this device.
        Samples with no valid visual token get an update of exactly 0.
        """
        d = self.dims
        check_embeddings("hidden_states", hidden_states, d.hidden_size, "T")
        B, T, _ = hidden_states.shape
        device = hidden_states.device
        check_like("ffn_output", ffn_output, hidden_states.shape, device, hidden_states.dtype,
                   "hidden_states")
        check_like("query_is_visual", query_is_visual, (B, T), device, torch.bool,
                   "hidden_states")
        if visual is None or (isinstance(visual, torch.Tensor) and visual.dim() == 3
                              and visual.shape[1] == 0):
            return torch.zeros_like(hidden_states) if ffn_output is None else ffn_output
        # Resolved and dtype-checked once here; the ops below are then called directly,
        # so a decode step does not re-resolve and re-validate per op.
        impl = resolve_backend(backend, device)
        check_backend_dtype(impl, hidden_states.dtype)
        check_backend_head_dim(impl, d.head_dim, hidden_states.dtype)

        # The stacked projection weights of this call, all in one launch: k/v and gate/up
        # with raw visual embeddings; gate/up alone with a memory when a backward follows
        # (without one, stacking a single pair costs the launch it saves).
        raw = not isinstance(visual, VisualMemory)
        stacks = self._stacks(impl, hidden_states, kv=raw,
                              gate_up=raw or torch.is_grad_enabled())
        if isinstance(visual, VisualMemory):
            if visual_mask is not None:
                raise ValueError("visual_mask must be None when visual is a VisualMemory "
                                 "(the memory carries its own mask)")
            memory = visual
            check_device("visual", memory.key, device, "hidden_states")
            if memory.key.dtype != hidden_states.dtype:
                raise TypeError(f"visual (a VisualMemory) is {memory.key.dtype}, hidden_states "
                                f"{hidden_states.dtype}: encode the memory in the same dtype")
        else:
            check_embeddings("visual", visual, d.hidden_size, "Nv")
            check_device("visual", visual, device, "hidden_states")
            if visual.dtype != hidden_states.dtype:
                raise TypeError(f"visual dtype {visual.dtype} differs from hidden_states "
                                f"dtype {hidden_states.dtype}")
            memory = self._encode(visual, visual_mask, impl, stacks)
        if memory.batch_size != B:
            raise ValueError(f"visual has batch size {memory.batch_size}, hidden_states {B}")
        if memory.key.shape[2:] != (d.num_kv_heads, d.head_dim):
            raise ValueError(f"VisualMemory heads {tuple(memory.key.shape[2:])} do not match "
                             f"this block's (Hkv, hd) = {(d.num_kv_heads, d.head_dim)}")

        keep = None
        if memory.key_mask is not None:
            keep = memory.has_visual[:, None].expand(B, T)
        if query_is_visual is not None:
            keep = ~query_is_visual if keep is None else keep & ~query_is_visual

        scale = 1.0 / math.sqrt(d.head_dim)
        q = self._queries(hidden_states, impl, raw=True)
        norm = self.cross_attn.q_norm
        if self._fused_q_norm(impl, False, q.dtype):
            a = impl.retrieval_qnorm(q, norm.weight, norm.eps, memory.key, memory.value,
                                     memory.key_mask, memory.kv_len, scale)
        else:
            a = impl.retrieval(self._norm(impl, norm, q), memory.key, memory.value,
                               memory.key_mask, memory.kv_len, scale)
        return self._update(impl, a, keep, ffn_output, stacks)

    # ---- varlen (packed sequences) ---------------------------------------------------------

    def encode_visual_varlen(self, visual: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_seqlen: int, backend: Optional[str] = None
                             ) -> PackedVisualMemory:
        """Project packed visual embeddings once: visual [total_k, D], sequence b's tokens at
        rows cu_seqlens[b]:cu_seqlens[b + 1] (int32 [N + 1]); max_seqlen the most tokens of
        one sequence. Returns a PackedVisualMemory for ``forward_varlen``."""
        self._check_packed_visual(visual, cu_seqlens)
        impl = resolve_backend(backend, visual.device)
        stacks = self._stacks(impl, visual, kv=torch.is_grad_enabled(), gate_up=False)
        return self._encode_varlen(visual, cu_seqlens, max_seqlen, impl, stacks)

    def _check_packed_visual(self, visual, cu_seqlens) -> None:
        d = self.dims
        if not isinstance(visual, torch.Tensor) or visual.dim() != 2 or \
                visual.shape[-1] != d.hidden_size:
            raise ValueError(f"visual must be [total_k, {d.hidden_size}], got "
                             f"{tuple(visual.shape) if isinstance(visual, torch.Tensor) else type(visual).__name__}")
        check_cu_seqlens("cu_seqlens", cu_seqlens, visual.device, None)

    def _encode_varlen(self, visual, cu_seqlens, max_seqlen, impl,
                       stacks: Dict[str, torch.Tensor]) -> PackedVisualMemory:
        """encode_visual_varlen on a resolved backend, arguments checked by the caller
        (``_encode``'s packed twin)."""
        return PackedVisualMemory.from_kv(*self._keys_values(visual, impl, stacks), cu_seqlens,
                                          max_seqlen)

    def forward_varlen(self, hidden_states: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       max_seqlen_q: int,
                       visual: Union[torch.Tensor, PackedVisualMemory, None],
                       cu_seqlens_k: Optional[torch.Tensor] = None,
                       max_seqlen_k: Optional[int] = None,
                       query_is_visual: Optional[torch.Tensor] = None,
                       ffn_output: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> torch.Tensor:
        """The PVM update of N packed sequences: [total_q, D], or ``ffn_output + u``.

        hidden_states [total_q, D]: sequence b's tokens at rows cu_seqlens_q[b]:
        cu_seqlens_q[b + 1] (int32 [N + 1]); max_seqlen_q the longest (a Python int).
        visual: packed embeddings [total_k, D] with cu_seqlens_k / max_seqlen_k, a
        PackedVisualMemory from ``encode_visual_varlen`` (which carries them), or None
        (text only: zeros, or ffn_output itself). Sequence b retrieves from its own visual
        tokens only. query_is_visual [total_q] bool: the update is 0 there. Sequences with
        no visual token, and rows of no sequence, get exactly 0. The same math as
        ``forward`` on each sequence alone (tests/test_fused_pvm_varlen.py).
        """
        d = self.dims
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2 or \
                hidden_states.shape[-1] != d.hidden_size:
            raise ValueError(f"hidden_states must be [total_q, {d.hidden_size}], got "
                             f"{tuple(getattr(hidden_states, 'shape', ()))}")
        total_q = hidden_states.shape[0]
        device = hidden_states.device
        check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device, None)
        check_like("ffn_output", ffn_output, hidden_states.shape, device, hidden_states.dtype,
                   "hidden_states")
        check_like("query_is_visual", query_is_visual, (total_q,), device, torch.bool,
                   "hidden_states")
        if visual is None:
            return torch.zeros_like(hidden_states) if ffn_output is None else ffn_output
        impl = resolve_backend(backend, device)
        check_backend_dtype(impl, hidden_states.dtype)
        check_backend_head_dim(impl, d.head_dim, hidden_states.dtype)
        if impl.retrieval_varlen is None:
            raise ValueError(f"backend {impl.name!r} has no varlen retrieval")
        raw = not isinstance(visual, PackedVisualMemory)  # stacked weights: see forward
        stacks = self._stacks(impl, hidden_states, kv=raw,
                              gate_up=raw or torch.is_grad_enabled())
        if isinstance(visual, PackedVisualMemory):
            if cu_seqlens_k is not None or max_seqlen_k is not None:
                raise ValueError("cu_seqlens_k / max_seqlen_k must be None when visual is a "
                                 "PackedVisualMemory (it carries its own)")
            memory = visual
            check_device("visual", memory.key, device, "hidden_states")
        else:
            if cu_seqlens_k is None or max_seqlen_k is None:
                raise ValueError("packed visual embeddings need cu_seqlens_k and max_seqlen_k")
            check_device("visual", visual, device, "hidden_states")
            if visual.dtype != hidden_states.dtype:
                raise TypeError(f"visual dtype {visual.dtype} differs from hidden_states "
                                f"dtype {hidden_states.dtype}")
            self._check_packed_visual(visual, cu_seqlens_k)
            memory = self._encode_varlen(visual, cu_seqlens_k, max_seqlen_k, impl, stacks)
        if memory.key.dtype != hidden_states.dtype:
            raise TypeError(f"visual (a PackedVisualMemory) is {memory.key.dtype}, "
                            f"hidden_states {hidden_states.dtype}")
        if memory.num_sequences != cu_seqlens_q.shape[0] - 1:
            raise ValueError(f"visual describes {memory.num_sequences} sequences, cu_seqlens_q "
                             f"{cu_seqlens_q.shape[0] - 1}")

        # keep[i]: row i belongs to a sequence with visual tokens (and is not itself visual).
        # The sequence of each row from the lengths, on the device: no host sync.
        rows = torch.arange(total_q, device=device, dtype=torch.int32)
        seq = torch.searchsorted(cu_seqlens_q[1:].contiguous(), rows, right=True)
        has = torch.cat([memory.has_visual, memory.has_visual.new_zeros(1)])
        keep = has[seq] & (rows >= cu_seqlens_q[0])
        if query_is_visual is not None:
            keep = keep & ~query_is_visual

        scale = 1.0 / math.sqrt(d.head_dim)
        q = self._queries(hidden_states, impl, raw=True)
        norm = self.cross_attn.q_norm
        if self._fused_q_norm(impl, True, q.dtype):
            # The lengths validated as the functional op does (CPU tensors only: no sync)
            if device.type == "cpu" and not torch.compiler.is_compiling():
                validate_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, int(max_seqlen_q),
                                    "max_seqlen_q")
                validate_cu_seqlens("cu_seqlens_k", memory.cu_seqlens, memory.key.shape[0],
                                    memory.max_seqlen, "max_seqlen_k")
            a = impl.retrieval_varlen_qnorm(
                q, norm.weight, norm.eps, memory.key, memory.value, cu_seqlens_q,
                memory.cu_seqlens, int(max_seqlen_q), memory.max_seqlen, scale)
        else:
            # Through the functional op: on CPU it validates the lengths against max_seqlen.
            a = pvm_retrieval_varlen(self._norm(impl, norm, q), memory.key,
                                     memory.value, cu_seqlens_q, memory.cu_seqlens,
                                     int(max_seqlen_q), memory.max_seqlen, scale,
                                     backend=impl.name)
        return self._update(impl, a, keep, ffn_output, stacks)
