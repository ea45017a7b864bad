"""FlashAttention-2's variable-length contract written out, to stand in for its kernel (which
has no CPU build) where tests check the packing around it."""

from __future__ import annotations

import math

import torch


def reference_flash(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k=None):
    """Sequence i's queries are rows ``cu_q[i]:cu_q[i + 1]`` of ``q`` (tokens, heads, d), its
    keys rows ``cu_k[i]:cu_k[i + 1]`` of ``k``/``v`` (keys, kv_heads, d), only the first
    ``seqused_k[i]`` of them if given; causal with the last query aligned to the last key
    used."""
    # the kernel's input rules: int32 offsets and key counts, contiguous
    for offsets in (cu_q, cu_k) if seqused_k is None else (cu_q, cu_k, seqused_k):
        assert offsets.dtype == torch.int32 and offsets.is_contiguous()
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        end = int(cu_k[i + 1]) if seqused_k is None else int(cu_k[i]) + int(seqused_k[i])
        qs = q[cu_q[i] : cu_q[i + 1]]  # (n, heads, d)
        ks = k[cu_k[i] : end].repeat_interleave(group, dim=1)  # (m, heads, d)
        vs = v[cu_k[i] : end].repeat_interleave(group, dim=1)
        n, m = qs.shape[0], ks.shape[0]
        scores = torch.einsum("nhd,mhd->hnm", qs, ks) / math.sqrt(q.shape[-1])
        query_pos = torch.arange(n).unsqueeze(1) + m - n
        scores = scores.masked_fill(torch.arange(m).unsqueeze(0) > query_pos, float("-inf"))
        out[cu_q[i] : cu_q[i + 1]] = torch.einsum("hnm,mhd->nhd", scores.softmax(-1), vs)
    return out
