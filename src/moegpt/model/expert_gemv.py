"""Matrix-vector products with per-row expert weights, reading the weights where they are.

A decode step routes a handful of tokens, so each expert multiplies one or two rows. Gathering
the routed experts' matrices first (``weight[expert_ids]``) copies them, which reads every
expert byte three times (read, write, read again); a grouped GEMM reads them once but tiles
for many rows. This Triton kernel reads each routed row's expert matrix once, in place, and
accumulates in fp32: a decode step's expert layers become bound by the bytes of the experts
they touch, as a bandwidth-bound step should be.

Without Triton (CPU builds of PyTorch) or off CUDA, the gathered batched GEMV runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU wheels of PyTorch ship without Triton
    triton = None

# Output rows and reduction columns per program; the grid is (ceil(out / BLOCK_N), rows), so
# even one row spreads over more programs than an H100 has SMs. On an H100, for one row of a
# (2048 x 2048) bf16 expert: 4 x 512 took 4.6 us (1.8 TB/s of its bytes), 8 x 256 7.2 us,
# 16 x 256 10.7 us, against 20.8 us gathering the matrix for a batched GEMV and 14.5 us for
# the grouped GEMM (benchmarks/expert_gemv.py, benchmarks/results/expert_gemv-h100.txt).
BLOCK_N = 4
BLOCK_K = 512
# What the kernel reads: it sums in fp32, too coarse for a float64 model.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def _expert_gemv_kernel(
        x_ptr,
        w_ptr,
        up_ptr,
        ids_ptr,
        out_ptr,
        n_out,
        n_in,
        stride_x,
        stride_expert,
        stride_row,
        stride_out,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_IDS: tl.constexpr,
        GATED: tl.constexpr,
    ):
        # GATED: silu(w x) * (up x), SwiGLU's hidden layer, from the two matrices' rows at once
        # (up laid out as w); else w x. Sums in fp32, one rounding at the store.
        block = tl.program_id(0)
        row = tl.program_id(1)
        expert = tl.load(ids_ptr + row).to(tl.int64) if HAS_IDS else 0
        outs = block * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok = outs < n_out
        rows = expert * stride_expert + outs[:, None].to(tl.int64) * stride_row
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        up = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, n_in, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < n_in
            x = tl.load(x_ptr + row * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            tile = out_ok[:, None] & col_ok[None, :]
            w = tl.load(w_ptr + rows + cols[None, :], mask=tile, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            if GATED:
                u = tl.load(up_ptr + rows + cols[None, :], mask=tile, other=0.0)
                up += tl.sum(u.to(tl.float32) * x[None, :], axis=1)
        if GATED:
            acc = acc * tl.sigmoid(acc) * up
        tl.store(out_ptr + row * stride_out + outs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)

    @torch.library.triton_op("moegpt::expert_gemv", mutates_args=())
    def _expert_gemv(
        x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        rows, n_in = x.shape
        if weight.shape[2] != n_in or expert_ids.shape != (rows,):
            raise ValueError(
                f"expert_gemv: rows {tuple(x.shape)}, weights {tuple(weight.shape)} and ids "
                f"{tuple(expert_ids.shape)} do not match"
            )
        x, expert_ids = x.contiguous(), expert_ids.contiguous()  # the kernel reads rows densely
        return _launch(x, weight, expert_ids, weight.stride(0), weight.stride(1))

    @torch.library.triton_op("moegpt::gated_expert_gemv", mutates_args=())
    def _gated_expert_gemv(
        x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        if gate.shape != up.shape or gate.stride() != up.stride():
            raise ValueError(
                f"gated_expert_gemv: gate {tuple(gate.shape)} and up {tuple(up.shape)} weights "
                "must match in shape and layout"
            )
        if gate.shape[2] != x.shape[1] or expert_ids.shape != (x.shape[0],):
            raise ValueError(
                f"gated_expert_gemv: rows {tuple(x.shape)}, weights {tuple(gate.shape)} and ids "
                f"{tuple(expert_ids.shape)} do not match"
            )
        x, expert_ids = x.contiguous(), expert_ids.contiguous()
        return _launch(x, gate, expert_ids, gate.stride(0), gate.stride(1), up=up)

    @torch.library.triton_op("moegpt::dense_gemv", mutates_args=())
    def _dense_gemv(x: torch.Tensor, weight: torch.Tensor, fp32_out: bool) -> torch.Tensor:
        if weight.shape[1] != x.shape[1]:
            raise ValueError(
                f"dense_gemv: rows {tuple(x.shape)} and weight {tuple(weight.shape)} do not match"
            )
        x = x.contiguous()
        # Every row reads the one matrix: no expert ids (the kernel skips their load).
        out = x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32 if fp32_out else None)
        return _launch(x, weight.unsqueeze(0), None, 0, weight.stride(0), out=out)

    def _launch(
        x: torch.Tensor,
        weight: torch.Tensor,
        expert_ids: torch.Tensor | None,
        stride_expert: int,
        stride_row: int,
        up: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows, n_in = x.shape
        n_out = weight.shape[1]
        out = x.new_empty(rows, n_out) if out is None else out  # the store casts to its dtype
        # Output blocks on the first grid axis: CUDA caps the second at 65,535.
        grid = (triton.cdiv(n_out, BLOCK_N), rows)
        torch.library.wrap_triton(_expert_gemv_kernel)[grid](
            x,
            weight,
            weight if up is None else up,  # read only when gated
            x if expert_ids is None else expert_ids,  # not read without ids
            out,
            n_out,
            n_in,
            x.stride(0),
            stride_expert,
            stride_row,
            out.stride(0),
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            HAS_IDS=expert_ids is not None,
            GATED=up is not None,
        )
        return out


def kernel_reads(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can read these operands wherever they are (Triton's interpreter runs
    it on CPU tensors: the tests' way to check it without a GPU)."""
    return (
        triton is not None
        and x.dtype == weight.dtype
        and x.dtype in KERNEL_DTYPES
        and weight.stride(-1) == 1
    )


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`expert_gemv` runs the Triton kernel for these operands."""
    return x.is_cuda and weight.is_cuda and kernel_reads(x, weight)


# A decode step's dense projections (attention's Q/K/V and output, a dense feed-forward) run as
# GEMVs up to this many rows. On an H200 (benchmarks/results/expert_gemv-dense-h200.txt) cuBLAS
# takes 7.4 us for one row of small-moe's (1024 x 1024) output projection, the kernel 2.6; at
# medium-moe's 2048 wide the two are close (5.2 and 4.3 us) up to 2 rows, and at 4 rows
# cuBLAS is faster there (5.3 against 9.5 us for Q/K/V) while the kernel still wins at
# small-moe's width (3.4 against 7.0 us): 2 rows is where it wins or ties on both.
# Small-moe's batch-1 decode went from 1,145 to 1,209 tokens/s; medium-moe's stayed at 510-515.
DENSE_GEMV_MAX_ROWS = 2


def dense_gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` is a decode step's product for :func:`dense_gemv`: no gradient
    wanted, at most :data:`DENSE_GEMV_MAX_ROWS` rows, and a plain CUDA weight (not a sharded
    tensor subclass) that the kernel reads."""
    # The row count last: under torch.compile with dynamic shapes it is the one check that
    # specialises a graph (at most 2 rows or more), so training and CPU steps never meet it.
    return (
        not torch.is_grad_enabled()
        and kernel_applies(x, weight)
        and type(weight) in (torch.Tensor, nn.Parameter)
        and x.numel() <= DENSE_GEMV_MAX_ROWS * x.shape[-1]
    )


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, fp32_out: bool = False) -> torch.Tensor:
    """``x @ weight.T`` ((..., in) by (out, in)): through the GEMV kernel where
    :func:`dense_gemv_applies`, else ``F.linear``. ``fp32_out`` keeps the fp32 sums (the
    kernel's, or ``F.linear``'s over fp32 operands) instead of rounding them to ``x``'s
    dtype: a bf16 router's logits, exactly as from fp32 copies of its operands."""
    if not dense_gemv_applies(x, weight):
        if fp32_out:
            return F.linear(x.float(), weight.float())
        return F.linear(x, weight)
    rows = x.numel() // x.shape[-1]
    out = _dense_gemv(x.reshape(rows, x.shape[-1]), weight, fp32_out)
    return out.view(*x.shape[:-1], weight.shape[0])


class DecodeLinear(nn.Linear):
    """``nn.Linear`` (no bias) whose forward takes a decode step's few rows through the GEMV
    kernel (:func:`dense_gemv`). The choice is made inside the module's call, so its hooks run
    either way: tensor-parallel serving sums a row-parallel layer's output in one."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_gemv(x, self.weight)


def gated_expert_gemv(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """SwiGLU's hidden layer for each row ``x[s]``: silu(gate[e] x) * (up[e] x) with ``e =
    expert_ids[s]`` ((experts, hidden, in) weights), one kernel where :func:`kernel_applies`
    (both products and the activation, sums in fp32), else the two GEMVs and the activation."""
    if kernel_applies(x, gate) and kernel_applies(x, up) and gate.stride() == up.stride():
        return _gated_expert_gemv(x, gate, up, expert_ids)
    return F.silu(expert_gemv(x, gate, expert_ids)) * expert_gemv(x, up, expert_ids)


def expert_gemv(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Each row ``x[s]`` (rows, in) times ``weight[expert_ids[s]].T`` ((experts, out, in)
    weights): (rows, out) in ``x``'s dtype."""
    if kernel_applies(x, weight):
        return _expert_gemv(x, weight, expert_ids)
    return torch.bmm(weight[expert_ids], x.unsqueeze(-1)).squeeze(-1)
