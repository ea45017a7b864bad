"""Speculative decoding's proposers: they guess a few tokens ahead, the target model scores
them all in one forward, and :func:`moegpt.serve.sampler.verify` keeps a prefix of them such
that the output distribution is exactly the target's (Leviathan et al. 2023, Chen et al.
2023). How many to propose is the scheduler's choice (:mod:`moegpt.serve.lookahead`).

Two proposers: :class:`NgramProposer` (prompt lookup: the tokens that followed the latest
earlier occurrence of the sequence's last n-gram; no model) and :class:`DraftProposer` (a
smaller model with its own paged cache laid out on the target's block tables, so the draft
needs no block manager of its own and a rollback is a shorter ``draft_computed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.serve.runner import ModelForward, ModelInput, RunnerSequence, build_forward
from moegpt.serve.sampler import Proposal, distribution


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (longest n first, ``max_n`` down to ``min_n``) and propose what followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """No cache to keep in step with the target's."""

    def propose(self, requests: list[tuple[RunnerSequence, int]]) -> list[Proposal]:
        return [Proposal(self._lookup(seq.tokens, k)) for seq, k in requests]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        arr = np.asarray(tokens)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(arr[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist()
        return []


class DraftProposer:
    """A smaller model proposing k tokens in k batched forwards: the first catches each
    sequence's draft cache up with its accepted tokens and draws the first proposal, each
    further one extends the proposals by a token. Its cache has the target cache's block
    geometry and is addressed through the target's block tables."""

    def __init__(self, draft: Transformer, config: ServeConfig, num_blocks: int) -> None:
        self.model = draft.eval()
        self.forward: ModelForward = build_forward(
            draft, _with_blocks(config, num_blocks), tp_group=None
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply the target's copy-on-write copies to the draft cache too."""
        self.forward.cache.copy_blocks(copies)

    @torch.inference_mode()
    def propose(self, requests: list[tuple[RunnerSequence, int]]) -> list[Proposal]:
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        for round_ in range(max((k for _, k in requests), default=0)):
            active = [i for i, (_, k) in enumerate(requests) if k > round_]
            inp = ModelInput()
            for i in active:
                seq = requests[i][0]
                context = seq.tokens + tokens[i]
                begin = seq.draft_computed if round_ == 0 else len(context) - 1
                inp.add_sequence(len(context) - begin, begin, seq.row, seq.blocks)
                inp.tokens += context[begin:]
                inp.positions += list(range(begin, len(context)))
                inp.logits_rows.append(len(inp.tokens) - 1)
                seq.draft_computed = len(context)
            logits = self.forward(inp)
            for i, row in zip(active, logits, strict=True):
                seq = requests[i][0]
                p = distribution(row, seq.params)
                token = (
                    int(p.argmax())
                    if seq.params.greedy
                    else int(torch.multinomial(p, 1, generator=seq.generator))
                )
                tokens[i].append(token)
                probs[i].append(p)
        return [
            Proposal(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs, strict=True)
        ]


def _with_blocks(config: ServeConfig, num_blocks: int) -> ServeConfig:
    return replace(config, num_kv_blocks=num_blocks, tp=1)


def check_draft(target: Transformer, draft: Transformer) -> None:
    """The draft must have the target's vocabulary size (the folders' tokenizers are compared
    by :func:`moegpt.serve.engine.load_draft`)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise UserError(
            f"serve.draft: vocabulary of {draft.config.vocab_size} tokens, the target has "
            f"{target.config.vocab_size}; a draft needs the target's tokenizer"
        )


@dataclass
class SpecStats:
    """Speculation counters (reported in the engine's stats and the server's /metrics)."""

    proposed: int = 0
    accepted: int = 0
    verifications: int = 0  # sequence-steps that verified at least one proposed token
    proposed_at: list[int] = field(default_factory=list)  # by position 1..k
    accepted_at: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Proposed tokens accepted per verification (the bonus token not counted)."""
        return self.accepted / self.verifications if self.verifications else 0.0

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.verifications += 1
        grow = proposed - len(self.proposed_at)
        if grow > 0:
            self.proposed_at += [0] * grow
            self.accepted_at += [0] * grow
        for i in range(proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < accepted
