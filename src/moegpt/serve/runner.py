"""The model runner: it executes the scheduler's plain-data steps (:mod:`moegpt.serve.step`).

Two layers. :class:`ModelForward` runs one packed forward over every scheduled chunk through
the paged cache; its input, :class:`ModelInput`, is plain integers, so tensor-parallel
followers can receive it from rank 0 and run the same forward. :class:`ModelRunner` keeps
what running the model needs per sequence (its tokens, sampling generator, draft-cache
length), proposes speculative tokens, builds each step's :class:`ModelInput`, and turns the
logits into tokens: one batched draw on the device for plain rows, the acceptance rule for
verified proposals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import sdpa_kernel

from moegpt.config import ServeConfig
from moegpt.console import stderr
from moegpt.errors import UserError
from moegpt.memory import kv_budget_bytes
from moegpt.model import Transformer
from moegpt.model.attention import KVCacheLike
from moegpt.model.vision import VisionLanguageModel
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.media import VisualCache, cross_attention
from moegpt.serve.paged import (
    SDPA_BACKENDS,
    DecodeBatch,
    PagedKVCache,
    PagedStep,
    SequenceSlice,
    VarlenStep,
    bytes_per_token,
    flash_applies,
)
from moegpt.serve.sampler import Draw, Proposal, Sampled, draw, verify_batch
from moegpt.serve.sequence import SamplingParams
from moegpt.serve.step import RunnerOutput, SchedulerOutput
from moegpt.serve.table_rows import BlockTableRows, TableChange


@dataclass
class ModelInput:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    # per sequence: (offset in the packed batch, new tokens, tokens already cached, the row
    # of its block table in the forward's BlockTableRows)
    sequences: list[tuple[int, int, int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # packed rows to return logits of
    tables: list[TableChange] = field(default_factory=list)  # applied before the step runs

    def add_sequence(self, new: int, past: int, row: int, blocks: Sequence[int]) -> None:
        """Another sequence's slot in the batch, its whole block table sent with it (for
        inputs built outside the runner: calibration, the draft model's)."""
        self.sequences.append((len(self.tokens), new, past, row))
        self.tables.append((row, 0, tuple(blocks)))


# Packed rows whose token is not known on the host yet, and their tokens on the device.
TokenPatch = tuple[list[int], torch.Tensor]


class Forward(Protocol):
    """One packed forward: one process's :class:`ModelForward`, or rank 0's tensor-parallel
    forward that sends each input to its followers first."""

    cache: PagedKVCache
    graphs: DecodeGraphs | None

    def __call__(
        self,
        inp: ModelInput,
        patch: TokenPatch | None = None,
        media: list[VisualCache | None] | None = None,
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


class ModelForward:
    """Packed forwards over one paged cache: a uniform step (every sequence runs the same
    number of new tokens and every row is sampled: decoding, or verifying equal numbers of
    proposals) through ``graphs`` when it has a bucket for it, anything else eagerly.

    With ``vision`` (whose language model ``model`` is), every forward runs its
    cross-attention blocks, each sequence's tokens attending to its own images (``media``)."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        device: torch.device,
        batch_invariant: bool = True,
        graphs: DecodeGraphs | None = None,
        vision: VisionLanguageModel | None = None,
    ) -> None:
        if vision is not None and (graphs is not None or vision.lm is not model):
            raise ValueError("a vision forward runs eagerly, over the vision model's own LM")
        self.model = model
        self.cache = cache
        self.device = device
        self.batch_invariant = batch_invariant
        self.graphs = graphs
        self.vision = vision
        scratch = cache.scratch_block
        self.tables = BlockTableRows(fill=0 if scratch is None else scratch)

    def close(self) -> None:
        """Destroy the decode graphs (before the process group goes: graphs that captured its
        collectives keep NCCL from tearing it down)."""
        if self.graphs is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no replay still running
            self.graphs.release()
            self.graphs = None

    @torch.inference_mode()
    def __call__(
        self,
        inp: ModelInput,
        patch: TokenPatch | None = None,
        media: list[VisualCache | None] | None = None,
    ) -> torch.Tensor:
        """Logits (len(logits_rows), vocab) in fp32. ``patch`` overwrites tokens on the
        device (ones the previous step is still drawing); ``media`` are the sequences' images
        (a vision forward's, in ``inp.sequences`` order; None: none)."""
        self.tables.apply(inp.tables)
        self.cache.copy_blocks(inp.copies)
        if not inp.tokens:
            return torch.empty(0)
        q_len = self._uniform(inp)
        if q_len:
            return self._replay(inp, q_len, patch)
        return self._eager(inp, patch, media)

    def _uniform(self, inp: ModelInput) -> int:
        """The new tokens per sequence of a step the graphs can run (0: none can)."""
        graphs = self.graphs
        if graphs is None:
            return 0
        q_len = inp.sequences[0][1]
        uniform = all(new == q_len for _, new, _, _ in inp.sequences)
        every_row = inp.logits_rows == list(range(len(inp.tokens)))
        context = max(past + new for _, new, past, _ in inp.sequences)
        fits = uniform and graphs.fits(len(inp.sequences), q_len, context)
        return q_len if every_row and fits else 0

    def _replay(self, inp: ModelInput, q_len: int, patch: TokenPatch | None) -> torch.Tensor:
        graphs = self.graphs
        assert graphs is not None
        _, news, pasts, rows = _columns(inp)
        keys = pasts + news
        window = graphs.bucket(len(rows), q_len, int(keys.max()))[2]
        logits = graphs.run(
            inp.tokens,
            inp.positions,
            self.tables.slots(rows, pasts, news, self.cache.block_size),
            self.tables.gather(rows, window),
            keys,
            q_len,
            patch,
        )
        return logits.float()  # every row, in order (see _uniform)

    def _eager(
        self,
        inp: ModelInput,
        patch: TokenPatch | None = None,
        media: list[VisualCache | None] | None = None,
    ) -> torch.Tensor:
        varlen = not self.batch_invariant and flash_applies(self.cache)
        offsets, news, pasts, rows = _columns(inp)
        keys = pasts + news
        key_starts = np.cumsum(keys) - keys  # each sequence's first slot in the step's slots
        size = self.cache.block_size
        slots = self.tables.slots(rows, np.zeros_like(pasts), keys, size)
        new_slots = self.tables.slots(rows, pasts, news, size)
        # Without varlen attention, two decodes or more attend as one padded batch (unless
        # batch-invariant), the rest sequence by sequence.
        decoding = (news == 1) & (not varlen and not self.batch_invariant)
        if decoding.sum() < 2:
            decoding[:] = False
        decodes = [offsets[decoding], key_starts[decoding], keys[decoding]]
        alone = ~decoding & (not varlen)
        columns = (c[alone].tolist() for c in (offsets, news, pasts, key_starts))
        singles = [SequenceSlice(*values) for values in zip(*columns, strict=True)]
        # Everything the step needs on the device travels as one host-to-device copy.
        # (The patched rows too: a list index would be copied on its own, synchronously.)
        patch_rows, patch_values = patch if patch is not None else ([], None)
        parts = [inp.tokens, inp.positions, new_slots, slots, inp.logits_rows, patch_rows]
        parts = [np.asarray(part, dtype=np.int64) for part in parts]
        if varlen:  # cumulative new tokens and keys
            parts += [*decodes, *(np.concatenate([[0], np.cumsum(c)]) for c in (news, keys))]
        else:
            parts += decodes
        flat = pinned_tensor(np.concatenate(parts)).to(self.device, non_blocking=True)
        tokens, positions, new_at, slots_at, logits_rows, patched, rows_at, starts, lengths, *cu = (
            flat.split([len(part) for part in parts])
        )
        if patch_values is not None:
            tokens[patched] = patch_values
        step: KVCacheLike
        if varlen:
            cu_q, cu_k = (c.to(torch.int32) for c in cu)
            step = VarlenStep(
                self.cache, slots_at, new_at, cu_q, cu_k, int(news.max()), int(keys.max())
            )
        else:
            longest = int(decodes[2].max()) if decoding.any() else 0
            batch = DecodeBatch(rows_at, starts, lengths, longest) if decoding.any() else None
            step = PagedStep(self.cache, slots_at, new_at, singles, batch)
        hooks = {}
        if self.vision is not None:
            vision = self.vision
            media = media or [None] * len(inp.sequences)
            slices = [(o, n, p, m) for (o, n, p, _), m in zip(inp.sequences, media, strict=True)]
            hooks = {
                "edit_embeddings": lambda h: vision.mark_images(tokens[None], h),
                "before_layer": cross_attention(vision, slices),
            }
        if self.graphs is not None and self.graphs.compiled and varlen and not hooks:
            return self.graphs.forward(tokens, positions, step)[logits_rows].float()
        with sdpa_kernel(SDPA_BACKENDS):
            out = self.model(tokens[None], positions=positions[None], cache=step, **hooks)
        return out.logits[0, logits_rows].float()


def pinned_tensor(values: list[int] | np.ndarray) -> torch.Tensor:
    """``values`` as an int64 tensor in pinned memory where there is a GPU: copied to the
    device with ``non_blocking``, it neither waits for the device nor goes through a staging
    copy."""
    tensor = torch.from_numpy(np.asarray(values, dtype=np.int64))
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


def _columns(inp: ModelInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``inp.sequences`` as four int64 arrays: offsets, new tokens, cached tokens, rows."""
    offsets, news, pasts, rows = zip(*inp.sequences, strict=True)
    return tuple(np.array(column, dtype=np.int64) for column in (offsets, news, pasts, rows))


def context_limit(model: Transformer, config: ServeConfig) -> int:
    """Most tokens one request may hold, prompt plus output: ``serve.max_model_len``, or the
    model's whole context."""
    limit = config.max_model_len or model.config.max_seq_len
    if limit > model.config.max_seq_len:
        raise UserError(
            f"serve.max_model_len: {limit:,} exceeds the model's context "
            f"(model.max_seq_len = {model.config.max_seq_len:,})"
        )
    return limit


def default_num_blocks(
    model: Transformer, config: ServeConfig, dtype: torch.dtype, extra_token_bytes: int = 0
) -> int:
    """Blocks for every sequence at its longest on CPU; on a GPU, what the KV-cache budget
    holds (:func:`moegpt.memory.kv_budget_bytes`), shared with ``extra_token_bytes`` per token
    of another cache on the same block tables (a draft model's)."""
    token_bytes = bytes_per_token(model.config, dtype, config.tp) + extra_token_bytes
    block_bytes = token_bytes * config.block_size
    device = next(model.parameters()).device
    if device.type == "cuda":
        return max(kv_budget_bytes(device)[0] // block_bytes, 1)
    return config.max_batch_size * -(-context_limit(model, config) // config.block_size)


def build_forward(
    model: Transformer,
    config: ServeConfig,
    tp_group: dist.ProcessGroup | None = None,
    extra_token_bytes: int = 0,
    vision: VisionLanguageModel | None = None,
) -> ModelForward:
    """A forward over a new paged cache of ``config.num_kv_blocks`` blocks (or as many as
    fit; tensor-parallel ranks agree on the smallest count), with decode graphs where
    :func:`graphs_wanted` (never with ``vision``: its steps run eagerly). Every rank fuses
    ``model``'s Q/K/V projections in place (one matmul a layer, see
    :meth:`Transformer.fuse_projections`)."""
    model.fuse_projections()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    blocks = config.num_kv_blocks or default_num_blocks(model, config, dtype, extra_token_bytes)
    if tp_group is not None:
        agreed = torch.tensor([blocks], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=tp_group)
        blocks = int(agreed)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    mode = config.decode_attention
    if mode == "auto":
        mode = "padded" if device.type == "cuda" else "per_sequence"
    wants_graphs = graphs_wanted(config, device, mode) and vision is None
    cache = PagedKVCache(
        model.config, blocks, config.block_size, dtype, device, tp=tp, spare_block=wants_graphs
    )
    graphs = None
    if wants_graphs:
        graphs = capture_graphs(model, cache, config, tp_group)
    return ModelForward(model, cache, device, mode == "per_sequence", graphs, vision)


def graphs_wanted(config: ServeConfig, device: torch.device, mode: str) -> bool:
    """Decode graphs: asked for, on a GPU, and in padded mode (graphs batch decodes, which
    the batch-invariant mode must not)."""
    return config.cuda_graphs and device.type == "cuda" and mode == "padded"


def graph_q_lens(config: ServeConfig) -> tuple[int, ...]:
    """New tokens per sequence the graphs are captured for: 1 to decode, and 1 + k to verify
    ``spec_tokens`` proposals when speculating (if they fit a block, as padding rows need)."""
    speculating = config.speculation != "off" and (config.draft or config.ngram)
    verify = 1 + config.spec_tokens
    return (1, verify) if speculating and verify <= config.block_size else (1,)


def graph_context(model: Transformer, config: ServeConfig, cached_tokens: int) -> int:
    """The longest sequence ``model``'s decode graphs serve: the served context, within the
    model's own (a draft may be shorter than its target: the lookahead policy never runs it
    past its context) and what its cache holds."""
    served = config.max_model_len or model.config.max_seq_len
    return min(served, model.config.max_seq_len, cached_tokens)


def capture_graphs(
    model: Transformer,
    cache: PagedKVCache,
    config: ServeConfig,
    tp_group: dist.ProcessGroup | None = None,
) -> DecodeGraphs | None:
    """Decode graphs for ``model`` over ``cache``, or None, with one warning line, where they
    can't be captured: decoding then runs eagerly. With ``config.compile`` the step is
    compiled first; if that fails the graphs are captured uncompiled (one warning line).
    Tensor-parallel ranks capture together and fall back together (all of them or none run
    graphs, or their collectives would not pair up)."""
    context = graph_context(model, config, cache.num_blocks * cache.block_size)
    q_lens = graph_q_lens(config)
    started = time.perf_counter()
    graphs = DecodeGraphs(model, cache, config.max_batch_size, context, q_lens, config.compile)
    failure = _capture(graphs, tp_group)
    if failure is not None and graphs.compiled and graphs.blocker() is None:
        _warn(f"compiling the decode step failed ({failure}); capturing it uncompiled")
        graphs = DecodeGraphs(model, cache, config.max_batch_size, context, q_lens)
        failure = _capture(graphs, tp_group)
    if failure is not None:
        _warn(f"CUDA graph capture failed ({failure}); decoding runs eagerly")
        return None
    compiled = "compiled " if graphs.compiled else ""
    seconds = time.perf_counter() - started
    stderr.print(
        f"serve: captured {graphs.captured} {compiled}CUDA graphs in {seconds:.1f} s",
        highlight=False,
    )
    return graphs


def _capture(graphs: DecodeGraphs, tp_group: dist.ProcessGroup | None) -> str | None:
    """Capture ``graphs``; the failure as one line, or None when every rank captured."""
    failure = None
    try:
        graphs.capture()
    except Exception as e:  # any failure to capture leaves a correct eager path
        failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if tp_group is not None:
        ok = torch.tensor([failure is None], dtype=torch.int32, device=graphs.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=tp_group)
        if failure is None and not int(ok):
            failure = "another tensor-parallel rank could not capture"
    if failure is not None:  # what was captured goes now (its collectives block teardown)
        graphs.release()
    return failure


def _warn(message: str) -> None:
    stderr.print(f"serve: {message}", highlight=False, markup=False)


class Proposer(Protocol):
    """Guesses the next tokens of sequences (:mod:`moegpt.serve.speculative`)."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None: ...

    def propose(self, requests: list[tuple[RunnerSequence, int]]) -> list[Proposal]: ...


@dataclass
class RequestImages:
    """A request's images (count, H, W) grey uint8, encoded at its first step, once for all
    of its samples."""

    pixels: torch.Tensor
    visual: VisualCache | None = None


@dataclass
class RunnerSequence:
    """The runner's own record of a sequence: its tokens (the prompt and every token the
    runner drew for it), how it samples, and what the draft model has cached."""

    tokens: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    row: int  # its block table's row in the forwards' BlockTableRows
    blocks: list[int] = field(default_factory=list)  # its block table
    draft_computed: int = 0
    images: RequestImages | None = None  # shared by the samples of one request
    # with prompt_logprobs: prompt positions whose next token is still to score (a
    # preempted sequence recomputing its prompt scores nothing twice)
    unscored: range = range(0)


@dataclass
class PromptRows:
    """The logits rows of a step that score prompt tokens, and the tokens they score."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # per sequence, in row order

    def add(self, seq_id: int, first_row: int, tokens: list[int], positions: range) -> None:
        self.rows += range(first_row, first_row + len(positions))
        self.targets += tokens[positions.start + 1 : positions.stop + 1]
        self.counts[seq_id] = len(positions)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each scored token's log-probability (fp32, on the device)."""
        device = logits.device
        picked = logits[torch.tensor(self.rows, device=device)].float().log_softmax(-1)
        targets = torch.tensor(self.targets, device=device)
        return picked.gather(1, targets[:, None]).squeeze(1)


@dataclass
class Launched:
    """A step on its way through the device: its draw, the draw's row of each sampling
    sequence, and the proposals it verifies (speculative steps finish at once)."""

    out: SchedulerOutput
    tokens_run: int
    draw: Draw | None = None
    draw_rows: dict[int, int] = field(default_factory=dict)
    result: RunnerOutput | None = None  # already complete (a speculative step)
    # prompt log-probabilities on the device, and how many of them each sequence has
    prompt_logprobs: torch.Tensor | None = None
    prompt_counts: dict[int, int] = field(default_factory=dict)


class ModelRunner:
    """Executes :class:`SchedulerOutput` steps on one model (this rank's shard under tensor
    parallelism) and returns what they drew.

    :meth:`execute` runs a step to its end. :meth:`launch` and :meth:`collect` split it so the
    host can plan and launch the next step while the device still runs this one: a token
    still being drawn when the next step needs it as input is taken straight from the
    previous draw on the device, never through the host."""

    def __init__(
        self,
        forward: Forward,
        device: torch.device,
        proposer: Proposer | None = None,
        vision: VisionLanguageModel | None = None,
    ) -> None:
        self.forward = forward
        self.cache = forward.cache
        self.device = device
        self.proposer = proposer
        self.vision = vision
        self.sequences: dict[int, RunnerSequence] = {}
        self._previous: Launched | None = None  # the last launched plain draw
        self._free_rows: list[int] = []  # block table rows of sequences gone
        self._rows_used = 0

    def _row(self) -> int:
        if self._free_rows:
            return self._free_rows.pop()
        self._rows_used += 1
        return self._rows_used - 1

    def _take_in(self, out: SchedulerOutput) -> list[TableChange]:
        """Learn of new and finished sequences and of the step's block table changes (which
        the forward's tables take in with the step)."""
        for seq_id in out.finished:
            gone = self.sequences.pop(seq_id, None)
            if gone is not None:
                self._free_rows.append(gone.row)
        for new in out.new:
            tokens = list(new.prompt)
            images = RequestImages(new.images) if new.images is not None else None
            if new.parent is not None:  # a fork shares its parent's images, encoded or not
                parent = self.sequences[new.parent]
                tokens, images = list(parent.tokens), parent.images
            generator = None
            if new.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(new.seed)
            seq = RunnerSequence(tokens, new.params, generator, self._row(), images=images)
            if new.params.prompt_logprobs and new.parent is None:
                seq.unscored = range(len(new.prompt) - 1)  # the last one has no next token
            self.sequences[new.seq_id] = seq
        changes = []
        for chunk in out.chunks:
            seq = self.sequences[chunk.seq_id]
            if chunk.table is not None:
                first, blocks = chunk.table
                seq.blocks[first:] = blocks
                changes.append((seq.row, first, blocks))
            # a preempted sequence recomputes from ``start``: so does its draft cache
            seq.draft_computed = min(seq.draft_computed, chunk.start)
        return changes

    def _propose(self, out: SchedulerOutput, result: RunnerOutput) -> dict[int, Proposal]:
        if self.proposer is None:
            return {}
        self.proposer.copy_blocks(out.copies)
        wanted = [(c.seq_id, c.lookahead) for c in out.chunks if c.lookahead]
        if not wanted:
            return {}
        start = time.perf_counter()
        proposals = self.proposer.propose([(self.sequences[i], k) for i, k in wanted])
        result.propose_seconds = time.perf_counter() - start
        found = {i: p for (i, _), p in zip(wanted, proposals, strict=True) if p.tokens}
        result.proposed = {i: len(p.tokens) for i, p in found.items()}
        return found

    def _visual(self, seq: RunnerSequence) -> VisualCache | None:
        """The sequence's images as the cross-attention reads them, encoded on first use."""
        images = seq.images
        if images is None or self.vision is None:
            return None
        if images.visual is None:  # the prompt's markers (the model never writes one)
            image_id = self.vision.image_token_id
            markers = [p for p, t in enumerate(seq.tokens) if t == image_id]
            images.visual = VisualCache.encode(self.vision, images.pixels, markers)
        return images.visual

    def _model_input(
        self, out: SchedulerOutput, proposals: dict[int, Proposal], tables: list[TableChange]
    ) -> tuple[
        ModelInput,
        dict[int, tuple[int, int]],
        TokenPatch | None,
        PromptRows,
        list[VisualCache | None],
    ]:
        """The packed forward input; for each sampling chunk its (first logits row, rows):
        1, or 1 + k to verify k proposed tokens (a fork shares its parent's row); the
        packed rows whose token the previous step is still drawing, with where on the device
        it will be; the rows that score prompt tokens; and each packed sequence's images."""
        inp = ModelInput(copies=out.copies, tables=tables)
        media: list[VisualCache | None] = []
        rows: dict[int, tuple[int, int]] = {}
        scoring = PromptRows()
        parents = {n.seq_id: n.parent for n in out.new if n.parent is not None}
        patch_rows, patch_sources = [], []
        vision = self.vision is not None
        for chunk in out.chunks:
            if chunk.seq_id in parents:
                rows[chunk.seq_id] = rows[parents[chunk.seq_id]]
                continue
            seq = self.sequences[chunk.seq_id]
            proposed = proposals[chunk.seq_id].tokens if chunk.seq_id in proposals else []
            end = chunk.start + chunk.length
            offset = len(inp.tokens)
            known = seq.tokens[chunk.start : end]
            if len(known) < chunk.length:  # the last one is being drawn: fetched on device
                assert self._previous is not None and len(known) == chunk.length - 1
                patch_rows.append(offset + len(known))
                patch_sources.append(self._previous.draw_rows[chunk.seq_id])
                known = [*known, 0]
            inp.tokens += known + proposed
            inp.positions += range(chunk.start, end + len(proposed))
            new = chunk.length + len(proposed)
            inp.sequences.append((offset, new, chunk.start, seq.row))
            media.append(self._visual(seq) if vision else None)
            unscored = seq.unscored
            scored = range(max(chunk.start, unscored.start), min(end, unscored.stop))
            if unscored and scored:  # position p's logits score prompt token p + 1
                scoring.add(chunk.seq_id, len(inp.logits_rows), seq.tokens, scored)
                inp.logits_rows += (offset + p - chunk.start for p in scored)
                seq.unscored = range(scored.stop, seq.unscored.stop)
            if chunk.sample:
                rows[chunk.seq_id] = (len(inp.logits_rows), 1 + len(proposed))
                inp.logits_rows += range(offset + new - 1 - len(proposed), offset + new)
        patch = None
        if patch_rows:
            assert self._previous is not None and self._previous.draw is not None
            sources = pinned_tensor(patch_sources).to(self.device, non_blocking=True)
            patch = (patch_rows, self._previous.draw.tokens[sources])
        return inp, rows, patch, scoring, media

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run ``out`` and return what it drew."""
        return self.collect(self.launch(out))

    def launch(self, out: SchedulerOutput) -> Launched:
        """Start ``out`` on the device. A step that verifies proposals completes here (its
        acceptance needs the logits on the host); a plain step returns while its forward
        and draw run, its tokens on their way to the host."""
        tables = self._take_in(out)
        result = RunnerOutput()
        proposals = self._propose(out, result)
        inp, rows, patch, scoring, media = self._model_input(out, proposals, tables)
        launched = Launched(out, len(inp.tokens))
        logits = self.forward(inp, patch, media if self.vision is not None else None)
        if scoring.counts:
            launched.prompt_logprobs = scoring.logprobs(logits)
            launched.prompt_counts = scoring.counts
        plain = [sid for sid in rows if sid not in proposals]
        if plain:
            seqs = [self.sequences[sid] for sid in plain]
            picked = [rows[sid][0] for sid in plain]
            every_row = picked == list(range(len(logits)))  # a plain decode step's
            launched.draw = draw(
                logits if every_row else logits[picked],
                [s.params for s in seqs],
                [s.generator for s in seqs],
            )
            launched.draw.copy_to_host()
            launched.draw_rows = {sid: i for i, sid in enumerate(plain)}
            self._previous = launched
        if proposals:
            start = time.perf_counter()
            result.sampled.update(self._verify(logits, rows, proposals))
            result.verify_seconds = time.perf_counter() - start
            launched.result = result
        return launched

    def collect(self, launched: Launched) -> RunnerOutput:
        """Wait for a launched step's tokens; what it drew."""
        result = launched.result or RunnerOutput()
        result.tokens_run = launched.tokens_run
        if launched.prompt_logprobs is not None:
            values = iter(launched.prompt_logprobs.tolist())
            for sid, count in launched.prompt_counts.items():
                result.prompt_logprobs[sid] = [next(values) for _ in range(count)]
        if launched.draw is not None:
            drawn = launched.draw.results()
            for sid, row in launched.draw_rows.items():
                result.sampled[sid] = [drawn[row]]
        for sid, tokens in result.sampled.items():
            seq = self.sequences.get(sid)
            if seq is not None:  # else it ended while this step ran
                seq.tokens += [t.token for t in tokens]
        if self._previous is launched:
            self._previous = None
        return result

    def _verify(
        self,
        logits: torch.Tensor,
        rows: dict[int, tuple[int, int]],
        proposals: dict[int, Proposal],
    ) -> dict[int, list[Sampled]]:
        """What each sequence keeps of its proposal (accepted tokens, then the corrected or
        bonus one), verified together against the target's rows; draft caches roll back to
        what was accepted."""
        ids = list(proposals)
        width = max(len(p.tokens) for p in proposals.values())
        # each sequence's 1 + k rows, padded to 1 + width by repeating its last
        index = [
            [first + min(i, count - 1) for i in range(width + 1)]
            for first, count in (rows[sid] for sid in ids)
        ]
        seqs = [self.sequences[sid] for sid in ids]
        verified = verify_batch(
            logits[torch.tensor(index, device=logits.device)],
            [s.params for s in seqs],
            [proposals[sid] for sid in ids],
            [s.generator for s in seqs],
        )
        for seq, tokens in zip(seqs, verified, strict=True):
            # The draft cached the proposals before the last; keep what the target accepted.
            seq.draft_computed = min(seq.draft_computed, len(seq.tokens) + len(tokens) - 1)
        return dict(zip(ids, verified, strict=True))
