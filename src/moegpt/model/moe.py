"""Mixture-of-Experts feed-forward: a top-k router, sort-based dispatch, grouped-GEMM experts.

Dispatch never loops over tokens: routed (token, expert) slots are sorted by expert so each
expert's tokens are one contiguous slice, all experts run as one grouped matrix multiply over
those slices, and the results are gathered back in token order and summed with the router
weights (gathers both ways, forward and backward: the sort is a permutation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.expert_gemv import (
    dense_gemv,
    dense_gemv_applies,
    expert_gemv,
    gated_expert_gemv,
)
from moegpt.model.feed_forward import gated_activation


@dataclass
class MoEStats:
    """What one MoE layer reports per forward (tensors; only the losses carry gradients)."""

    tokens_per_expert: torch.Tensor  # (n_experts,) routed slots per expert, before dropping
    dropped_fraction: torch.Tensor  # () share of routed slots dropped by the capacity limit
    # (all four over the tokens that are not padding)
    load_balance_loss: torch.Tensor  # () E * sum_e f_e * P_e; 1.0 when perfectly balanced
    z_loss: torch.Tensor  # () mean over tokens of logsumexp(router logits)^2
    aux_loss: torch.Tensor  # () the two losses weighted by their coefficients


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs.topk(k, dim=-1)`` (values and indices, largest first). For a few experts it
    runs as k max-reductions, which torch.compile fuses with the softmax before them: topk
    launches a sort of two kernels per layer on CUDA, a tenth of a batch-1 decode step."""
    if k > 4:
        return probs.topk(k, dim=-1)
    values, ids = [], []
    for _ in range(k):
        value, index = probs.max(dim=-1, keepdim=True)
        values.append(value)
        ids.append(index)
        probs = probs.scatter(-1, index, float("-inf"))  # the next pick excludes this one
    return torch.cat(values, dim=-1), torch.cat(ids, dim=-1)


class _SortSlots(torch.autograd.Function):
    """``x[order // k]``: each token's k slots, sorted by expert. Autograd would take the
    backward of a gather with repeated indices as a scatter-add into zeros (atomics); knowing
    that ``order`` is a permutation (``inverse`` undoes it), the gradient is a gather back to
    slot order and a sum over each token's k slots."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        by_slot = grad[inverse]
        return by_slot.view(-1, ctx.k, grad.shape[-1]).sum(dim=1), None, None, None


class _UnsortSlots(torch.autograd.Function):
    """``y[inverse]``: rows sorted by expert back in slot order, a gather both ways (the
    scatter ``out[order] = y`` would first fill a zeroed buffer)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor):
        ctx.save_for_backward(order)
        return y[inverse]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad[order], None, None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``inverse`` with ``inverse[order[i]] == i``."""
    positions = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return torch.empty_like(order).scatter_(0, order, positions)


class Router(nn.Module):
    """Learned top-k gate: fp32 logits, softmax over experts, top-k, weights renormalised to
    sum to 1 (Mixtral) unless ``router_renormalize`` is off (Switch-style top-1 keeps the raw
    probability, the only path by which the LM loss trains a top-1 router)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.renormalize = config.router_renormalize
        self.gate = nn.Linear(config.d_model, config.n_experts, bias=False)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return logits and probabilities (N, E), then weights and expert ids (N, k); fp32
        (float64 for a float64 model)."""
        # Routing decisions are sensitive to rounding: keep the gate in fp32 even under autocast
        # (and a float64 model in float64).
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            if dense_gemv_applies(x, self.gate.weight):  # a decode step: one GEMV, fp32 sums
                logits = dense_gemv(x, self.gate.weight, fp32_out=True)
            else:
                logits = F.linear(x.to(dtype), self.gate.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        weights, expert_ids = top_k(probs, self.top_k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, expert_ids


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor | list[int]
) -> torch.Tensor:
    """Rows of ``x`` sorted by group times each group's ``weight[e].T`` ((E, out, in) weights).

    ``groups`` as a list of sizes runs a loop over experts (fast on CPU, where grouped_mm is
    slow); as a tensor of int32 end offsets one ``torch._grouped_mm``.
    """
    if isinstance(groups, torch.Tensor):
        if x.shape[0] == 0:
            # An expert-parallel rank can receive no slots at all. Compiled, the CUDA kernel
            # refuses the empty buffer inductor makes for it (strides (0, 1)); a plain product
            # gives the same empty rows and zero gradients, and keeps x in the autograd graph
            # (its backward all-to-all must still run on this rank).
            return x @ weight[0].T
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=groups)
    chunks = x.split(groups)
    return torch.cat([chunk @ weight[e].T for e, chunk in enumerate(chunks)])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute ``x`` in: autocast's where it is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class GroupedExperts(nn.Module):
    """``n_experts`` feed-forward networks stored as 3-D weights (expert, out, in).

    ``use_grouped_mm`` None picks the grouped GEMM on CUDA in bf16, where it is fast, and the
    per-expert loop elsewhere; True or False forces one (tests compare the two).

    Where the grouped GEMM would run, an inference step of at most ``max_gathered_slots`` routed
    slots runs one matrix-vector product per slot over its expert's weights instead
    (:func:`moegpt.model.expert_gemv.expert_gemv`): at a decode step's few rows the grouped
    GEMM reads its experts' weights at a fraction of the memory bandwidth. Those rows come in
    token order with their expert ids (:meth:`routes_in_place`), so the step skips the sort,
    the counts and the scatter back. The choice depends only on shapes, so CUDA graphs
    capture either.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        n, d, h = config.n_experts, config.d_model, config.expert_hidden_size
        # On an H100 (medium-moe's experts, bf16) one projection of 8 rows took 25 us this
        # way against 35 us through the grouped GEMM, and 4.6 against 14.5 us at one row
        # (benchmarks/results/expert_gemv-h100.txt). Up to one slot per expert the rows read
        # no more weight bytes than the grouped GEMM reads when they hit every expert, and
        # the step skips its sort, counts and scatter: on an H200, small-moe's decode step
        # rose from 1.05 to 1.66 ms between 4 and 5 sequences when this stopped at 8 slots,
        # and to 1.2 ms only with it at 16 (one per expert).
        self.max_gathered_slots = max(8, n)
        self.activation = config.activation
        self.w1 = nn.Parameter(torch.empty(n, h, d))
        if config.activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(n, h, d))
        self.w2 = nn.Parameter(torch.empty(n, d, h))
        for weight in self.parameters():  # the Transformer re-initialises with depth scaling
            nn.init.normal_(weight, std=config.init_std)
        self.use_grouped_mm: bool | None = None

    def wants_grouped_mm(self, device: torch.device, dtype: torch.dtype, w1: torch.Tensor) -> bool:
        """Whether :meth:`compute` runs the grouped GEMM (no host sync, so CUDA graphs can
        capture it) rather than the per-expert loop (one ``counts.tolist()``)."""
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        # The CUDA kernel wants bf16 and 16-byte aligned rows (w1 is (experts, hidden, d_model)).
        aligned = w1.shape[1] % 8 == 0 and w1.shape[2] % 8 == 0
        return device.type == "cuda" and dtype == torch.bfloat16 and aligned

    def routes_in_place(self, x: torch.Tensor, n_slots: int) -> bool:
        """Whether ``n_slots`` routed rows of ``x`` run as per-row GEMVs in token order (pass
        ``expert_ids`` to :meth:`forward`) rather than sorted by expert (pass ``counts``)."""
        if torch.is_grad_enabled() or n_slots > self.max_gathered_slots:
            return False
        dtype = _compute_dtype(x)
        return self.wants_grouped_mm(x.device, dtype, self.w1)

    def weights(self) -> dict[str, torch.Tensor]:
        """The expert weights by name (w1, w3 for SwiGLU, w2)."""
        names = ("w1", "w3", "w2") if self.activation == "swiglu" else ("w1", "w2")
        return {name: getattr(self, name) for name in names}

    def forward(
        self,
        x: torch.Tensor,
        counts: torch.Tensor | None = None,
        expert_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: (slots, d_model) sorted by expert with ``counts`` (n_experts,) slots per
        expert; or, where :meth:`routes_in_place`, in any order with ``expert_ids`` (slots,)."""
        return self.compute(x, counts, self.weights(), expert_ids)

    def compute(
        self,
        x: torch.Tensor,
        counts: torch.Tensor | None,
        weights: dict[str, torch.Tensor],
        expert_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The experts' math with explicit weights, so that expert or tensor parallelism can
        run it on a rank's own experts or hidden slice (weights (E', out', in'), ``counts``
        (E',))."""
        dtype = _compute_dtype(x)
        if expert_ids is not None:  # per-row GEMVs in the rows' own order (routes_in_place)
            x = x.to(dtype)
            weights = {name: w.to(dtype) for name, w in weights.items()}
            if self.activation == "swiglu":  # gate, up and activation in one kernel
                hidden = gated_expert_gemv(x, weights["w1"], weights["w3"], expert_ids)
                return expert_gemv(hidden, weights["w2"], expert_ids)
            return self._feed_forward(x, weights, lambda x, w: expert_gemv(x, w, expert_ids))
        assert counts is not None, "sorted rows need their counts per expert"
        grouped = self.wants_grouped_mm(x.device, dtype, weights["w1"])
        if not grouped:  # the loop needs split sizes on the host (one sync)
            groups: torch.Tensor | list[int] = counts.tolist()
            return self._feed_forward(x, weights, lambda x, w: grouped_linear(x, w, groups))
        # grouped_mm is not an autocast op (the loop's matmuls follow autocast by themselves).
        x = x.to(dtype)
        weights = {name: w.to(dtype) for name, w in weights.items()}
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return self._feed_forward(x, weights, lambda x, w: grouped_linear(x, w, offsets))

    def _feed_forward(
        self,
        x: torch.Tensor,
        weights: dict[str, torch.Tensor],
        linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The gated feed-forward with ``linear(rows, expert weights)`` as its projections."""
        hidden = gated_activation(self.activation, lambda name: linear(x, weights[name]))
        return linear(hidden, weights["w2"])


class MoE(nn.Module):
    """Routed feed-forward layer; dropless unless ``capacity_factor`` > 0."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef = config.aux_loss_coef
        self.z_loss_coef = config.z_loss_coef
        self.router = Router(config)
        self.experts = GroupedExperts(config)

    def forward(
        self, x: torch.Tensor, padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """The layer's output and its router statistics (None under inference mode).

        ``padding`` (x's leading shape, bool) marks tokens that only fill a row: they are
        routed like the rest (their outputs are not trained on), but the statistics and losses
        leave them out, and under a capacity limit they take an expert's slots last."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, k = x.shape[0], self.top_k
        logits, probs, weights, expert_ids = self.router(x)
        combine = weights.dtype  # fp32 at least: the weighted sum over a token's k slots

        capped = self.capacity_factor > 0 and self.training  # else dropless
        if not capped and self.experts.routes_in_place(x, n_tokens * k):  # no sort or scatter
            rows = x.repeat_interleave(k, dim=0)  # slot s belongs to token s // k
            expert_out = self.experts(rows, expert_ids=expert_ids.reshape(-1))
            slots = expert_out.to(combine).view(n_tokens, k, -1) * weights.unsqueeze(-1)
            return slots.sum(dim=1).to(x.dtype).view(shape), None

        # Static shapes and no host sync on this path, so torch.compile sees one graph.
        flat_ids = expert_ids.reshape(-1)  # slot s belongs to token s // k
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        real = torch.ones(n_tokens, dtype=torch.bool, device=x.device)
        if padding is not None:
            real = ~padding.reshape(-1).to(x.device)
        real_slots = real.repeat_interleave(k)
        real_counts = torch.zeros_like(counts).scatter_add_(0, flat_ids, real_slots.long())
        if capped:
            # slots grouped by expert, token order kept within each, padding after the rest
            order = torch.argsort(flat_ids * 2 + (~real_slots).long(), stable=True)
            inverse = inverse_permutation(order)
            expert_out, kept = self._run_with_capacity(x, order, inverse, flat_ids, counts)
            kept = torch.minimum(real_counts, kept)  # the padding goes first
        else:  # dropless; also at inference, where dropping would couple a batch's requests
            order = torch.argsort(flat_ids, stable=True)  # grouped by expert, in token order
            inverse = inverse_permutation(order)
            rows = _SortSlots.apply(x, order, inverse, k)
            expert_out, kept = self.experts(rows, counts), real_counts

        # Combine: each slot's output back in slot order, weighted, summed over the k slots.
        by_slot = _UnsortSlots.apply(expert_out, order, inverse)
        weighted = by_slot.to(combine) * weights.reshape(-1, 1)
        out = weighted.view(n_tokens, k, shape[-1]).sum(dim=1).to(x.dtype)
        if not torch.is_grad_enabled():  # serving: no losses, a few dozen fewer kernels
            return out.view(shape), None
        return out.view(shape), self._stats(logits, probs, real_counts, kept, real)

    def _run_with_capacity(
        self,
        x: torch.Tensor,
        order: torch.Tensor,
        inverse: torch.Tensor,
        flat_ids: torch.Tensor,
        counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts over a fixed (experts x capacity) buffer: each expert keeps its first
        ``capacity`` slots in token order; the rest go to a discarded row and come back as 0.

        Returns the expert output per sorted slot and the kept slots per expert.
        """
        n_slots = order.numel()
        capacity = math.ceil(self.capacity_factor * n_slots / self.n_experts)
        sorted_ids = flat_ids[order]
        group_start = torch.cumsum(counts, dim=0) - counts
        rank = torch.arange(n_slots, device=x.device) - group_start[sorted_ids]
        trash = self.n_experts * capacity
        dest = torch.where(rank < capacity, sorted_ids * capacity + rank, trash)
        buffer = x.new_zeros(trash + 1, x.shape[-1])
        buffer[dest] = _SortSlots.apply(x, order, inverse, self.top_k)
        full = torch.full_like(counts, capacity)
        out = self.experts(buffer[:trash], full)
        out = torch.cat([out, out.new_zeros(1, out.shape[-1])])
        return out[dest], counts.clamp(max=capacity)

    def _stats(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        counts: torch.Tensor,
        kept: torch.Tensor,
        real: torch.Tensor,
    ) -> MoEStats:
        """Over the ``real`` tokens (not padding): ``counts`` and ``kept`` are their slots."""
        weight = real.to(probs.dtype)
        # an empty batch (or all padding) reports zeros, not NaN; no host sync either way
        tokens = weight.sum().clamp(min=1)
        slots = tokens * self.top_k
        routed_fraction = counts.to(probs.dtype) / slots  # f_e: no gradient (counts are discrete)
        mean_prob = (probs * weight[:, None]).sum(dim=0) / tokens  # P_e: the gradient path
        load_balance = self.n_experts * (routed_fraction * mean_prob).sum()
        z_loss = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / tokens
        return MoEStats(
            tokens_per_expert=counts.detach(),
            dropped_fraction=(counts - kept).sum().to(probs.dtype) / slots,
            load_balance_loss=load_balance,
            z_loss=z_loss,
            aux_loss=self.aux_loss_coef * load_balance + self.z_loss_coef * z_loss,
        )
