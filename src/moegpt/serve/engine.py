"""The engine: requests in, tokens out, one scheduler step at a time.

``Engine.step()`` asks the scheduler for a plan, runs it through the model runner, samples a
token for every sequence whose chunk reached its end, applies stop conditions and frees
finished sequences' blocks. ``generate()`` runs a batch to completion; ``AsyncEngine`` (in
:mod:`moegpt.serve.async_engine`) streams.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moegpt.config import ServeConfig
from moegpt.console import stderr
from moegpt.errors import UserError
from moegpt.memory import gib, kv_budget_bytes
from moegpt.model import Transformer
from moegpt.serve.blocks import BlockAllocator, BlockTable
from moegpt.serve.calibrate import calibrate
from moegpt.serve.detokenizer import IncrementalDetokenizer
from moegpt.serve.paged import bytes_per_token
from moegpt.serve.runner import ModelInput, Runner, build_runner
from moegpt.serve.sampler import Sampled, sample_batch, with_logprobs
from moegpt.serve.scheduler import (
    Chunk,
    Plan,
    Sample,
    Scheduler,
    SchedulerConfig,
    StepCostModel,
)
from moegpt.serve.sequence import SamplingParams, Sequence, Status
from moegpt.serve.speculative import (
    DraftProposer,
    NgramProposer,
    Proposal,
    Speculator,
    check_draft,
)
from moegpt.serve.stats import EngineStats
from moegpt.serve.tensor_parallel import TensorParallelRunner

REFIT_EVERY = 32  # steps between refits of the step-time model from measured steps


@dataclass
class RequestOutput:
    """What one step produced for one sequence of a request."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict] = field(default_factory=list)


def folder_tokenizer(path: str | Path) -> tuple[Any, int | None]:
    """The tokenizer of an exported model folder and its end-of-text id (None, None without
    a tokenizer.json: token ids in and out)."""
    from moegpt.data.tokenizer import END_OF_TEXT, load_tokenizer

    tokenizer_path = Path(path) / "tokenizer.json"
    if not tokenizer_path.is_file():
        return None, None
    tokenizer = load_tokenizer(tokenizer_path)
    return tokenizer, tokenizer.token_to_id(END_OF_TEXT)


def _dtype(model: Transformer) -> torch.dtype:
    return next(model.parameters()).dtype


def kv_cache_blocks(
    model: Transformer, config: ServeConfig, extra_token_bytes: int = 0
) -> tuple[int, str]:
    """KV-cache blocks for ``model``, sized by memory and never by ``max_seq_len`` alone, and
    where the size comes from, in words. On a GPU: as many as fit the budget (90% of the free
    memory); on CPU: enough for ``max_batch_size`` sequences at full context, at most what
    fits the budget (see :mod:`moegpt.memory`). ``serve.num_kv_blocks`` must fit it too.
    ``extra_token_bytes``: another cache sharing the block tables (a draft model's)."""
    device = next(model.parameters()).device
    token_bytes = bytes_per_token(model.config, _dtype(model), config.tp) + extra_token_bytes
    block_bytes = token_bytes * config.block_size
    budget, source = kv_budget_bytes(device)
    fits = budget // block_bytes
    words = f"budget {gib(budget)}: {source}"
    if config.num_kv_blocks:
        if config.num_kv_blocks > fits:
            raise UserError(
                f"serve.num_kv_blocks: {config.num_kv_blocks:,} blocks take "
                f"{gib(config.num_kv_blocks * block_bytes)}, more than the KV-cache {words}"
            )
        return config.num_kv_blocks, f"serve.num_kv_blocks = {config.num_kv_blocks:,}"
    if fits < 1:
        raise UserError(f"serve: one KV-cache block ({gib(block_bytes)}) exceeds the {words}")
    if device.type != "cuda":
        fits = min(fits, config.max_batch_size * -(-model.config.max_seq_len // config.block_size))
    return fits, words


def load_draft(
    target_path: str | Path, config: ServeConfig, target: Transformer
) -> Transformer | None:
    """``config.draft``'s model on the target's device and in its dtype (None without one);
    its tokenizer, when both folders have one, must be the target's."""
    from moegpt.weights import load

    if not config.draft:
        return None
    mine, theirs = Path(target_path) / "tokenizer.json", Path(config.draft) / "tokenizer.json"
    if mine.is_file() and theirs.is_file() and mine.read_bytes() != theirs.read_bytes():
        raise UserError(f"serve.draft: {theirs} differs from the target's tokenizer")
    parameter = next(target.parameters())
    return load(config.draft, device=parameter.device, dtype=parameter.dtype)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Any = None,
        config: ServeConfig | None = None,
        eos_id: int | None = None,
        tp_group: dist.ProcessGroup | None = None,
        draft: Transformer | None = None,
    ) -> None:
        """``tp_group``: ``model`` is this rank's tensor-parallel shard and the group's other
        ranks run :func:`moegpt.serve.tensor_parallel.follow` (see ``open_tensor_parallel``).
        ``draft``: a smaller model proposing tokens for speculative decoding (``config.ngram``
        proposes from n-grams instead)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or ServeConfig()
        self.eos_id = eos_id
        self.device = next(model.parameters()).device
        draft_bytes = 0 if draft is None else bytes_per_token(draft.config, _dtype(draft))
        blocks, budget = kv_cache_blocks(model, self.config, draft_bytes)
        sized = dataclasses.replace(self.config, num_kv_blocks=blocks)
        runner = build_runner(model, sized, tp_group, draft_bytes)
        self.allocator = BlockAllocator(runner.cache.num_blocks, self.config.block_size)
        # A sequence must fit the cache alone (else preempting it could never make room).
        capacity = self.allocator.num_blocks * self.config.block_size
        self.max_context = min(model.config.max_seq_len, capacity)
        if capacity < model.config.max_seq_len:
            stderr.print(
                f"serve: model.max_seq_len ({model.config.max_seq_len:,}) does not fit the KV "
                f"cache ({budget}); prompt plus output are capped at {capacity:,} tokens",
                highlight=False,
            )
        self.runner: Runner = runner if tp_group is None else TensorParallelRunner(runner, tp_group)
        tpot = self.config.tpot_ms / 1e3 if self.config.tpot_ms else None
        ttft = self.config.ttft_ms / 1e3 if self.config.ttft_ms else None
        self.scheduler = Scheduler(
            SchedulerConfig(
                self.config.max_batch_size, self.config.max_tokens_per_step, tpot, ttft
            ),
            self.allocator,
        )
        self.stats = EngineStats()
        # Step-time samples: the start-up calibration's span every shape; recent steps track
        # the machine as it runs. Both feed each refit.
        self._calibration: list[Sample] = []
        self._cost_samples: deque[Sample] = deque(maxlen=256)
        self.speculator = self._speculator(draft)
        adaptive = self.speculator is not None and self.config.speculation == "adaptive"
        if (tpot or ttft or adaptive) and self.config.calibrate:
            self.scheduler.cost, self._calibration = calibrate(
                self.runner, self.allocator, self.scheduler.config, self.max_context
            )
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}
        self._seed_rng = torch.Generator().manual_seed(0)

    def _speculator(self, draft: Transformer | None) -> Speculator | None:
        config = self.config
        if draft is not None:
            check_draft(self.model, draft)
            proposer = DraftProposer(draft, config, self.allocator.num_blocks)
            return Speculator(proposer, config, draft.config.max_seq_len)
        if config.ngram:
            return Speculator(NgramProposer(config.ngram_max, config.ngram_min), config)
        return None

    @classmethod
    def from_folder(
        cls,
        path: str | Path,
        config: ServeConfig | None = None,
        device: torch.device | str | None = None,
    ) -> Engine:
        """An engine over an exported model folder (its tokenizer.json, when present, gives
        text in and out and the end-of-text token that stops generation). For
        ``config.tp > 1`` use :func:`moegpt.serve.tp_engine.open_tensor_parallel`."""
        from moegpt.weights import load

        if config is not None and config.tp > 1:
            raise UserError("serve.tp: a tensor-parallel engine opens with open_tensor_parallel")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, eos_id = folder_tokenizer(path)
        model = load(path, device=device)
        draft = load_draft(path, config, model) if config is not None else None
        return cls(model, tokenizer, config, eos_id=eos_id, draft=draft)

    def close(self) -> None:
        """Release tensor-parallel followers (nothing to do for one process)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("prompt: text needs a tokenizer; pass token ids")
            return self.tokenizer.encode(prompt).ids
        return list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_prompt(ids)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise UserError(f"request_id: {request_id!r} is already running")
        seq = self._sequence(request_id, 0, ids, params)
        self._requests[request_id] = [seq]
        self.scheduler.add(seq)
        return request_id

    def check_prompt(self, ids: list[int]) -> None:
        """A prompt the engine can run: known tokens, room left to generate."""
        limit = self.max_context
        if not ids:
            raise UserError("prompt: empty")
        if len(ids) >= limit:
            what = "context" if limit == self.model.config.max_seq_len else "KV cache"
            raise UserError(f"prompt: {len(ids)} tokens leave no room in the {limit}-token {what}")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise UserError(f"prompt: token ids must be in 0..{self.model.config.vocab_size - 1}")

    def _sequence(
        self, request_id: str, index: int, prompt: list[int], params: SamplingParams
    ) -> Sequence:
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(2**62, (), generator=self._seed_rng))
            generator = torch.Generator(device=self.device).manual_seed(seed + index)
        return Sequence(
            next(self._seq_ids),
            request_id,
            index,
            prompt,
            params,
            BlockTable(self.allocator),
            generator,
            detokenizer=None
            if self.tokenizer is None
            else IncrementalDetokenizer(self.tokenizer, params.stop),
        )

    def abort(self, request_id: str) -> None:
        """Cancel a request at any point; its blocks are freed at once."""
        self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step --------------------------------------------------------------------------
    def _model_input(
        self, plan: Plan, proposals: dict[int, Proposal]
    ) -> tuple[ModelInput, list[tuple[Chunk, int]]]:
        """The step's packed input, and the chunks that reach their sequence's end with how
        many logits rows each gets (1, or 1 + k to verify k proposed tokens)."""
        inp = ModelInput(copies=plan.copies)
        sampling: list[tuple[Chunk, int]] = []
        for chunk in plan.chunks:
            seq, end = chunk.seq, chunk.start + chunk.length
            proposed = proposals[seq.seq_id].tokens if seq.seq_id in proposals else []
            offset = len(inp.tokens)
            inp.tokens += seq.tokens[chunk.start : end - len(proposed)] + proposed
            inp.positions += list(range(chunk.start, end))
            inp.sequences.append((offset, chunk.length, chunk.start, seq.table.slots(0, end)))
            if end - len(proposed) == len(seq.tokens):  # reaches the end: tokens can be drawn
                rows = 1 + len(proposed)
                inp.logits_rows += range(offset + chunk.length - rows, offset + chunk.length)
                sampling.append((chunk, rows))
        return inp, sampling

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()  # the latency bound covers the whole step
        spec = self.speculator
        if spec is not None:
            spec.plan_lookahead(self.scheduler.running, self.scheduler.cost, self.max_context)
        plan = self.scheduler.schedule()
        self.stats.preemptions += len(plan.preempted)
        if not plan.chunks:
            return []
        proposals = {}
        if spec is not None:
            proposing = time.perf_counter()
            proposals = spec.propose(plan.chunks, plan.copies)
            self.stats.propose_seconds += time.perf_counter() - proposing
        inp, sampling = self._model_input(plan, proposals)
        logits = self.runner.execute(inp)
        for chunk in plan.chunks:
            chunk.seq.computed = chunk.start + chunk.length
        drawn = self._draw_batch(logits, sampling, proposals)
        argmax = logits.argmax(dim=-1).tolist() if proposals else []
        outputs, row = [], 0
        for chunk, count in sampling:
            seq, rows, best = chunk.seq, logits[row : row + count], argmax[row : row + count]
            row += count
            if seq.seq_id not in proposals:
                outputs += [self._append(s, [drawn[s.seq_id]]) for s in self._family(seq)]
                continue
            assert spec is not None
            tokens = spec.accept(seq, rows, best, proposals[seq.seq_id], self.stats.spec)
            # The cache keeps the last token and the accepted proposals; the rest rolls back.
            seq.computed = chunk.start + len(tokens)
            seq.table.truncate(len(seq.tokens) + len(tokens))
            alternatives = seq.params.logprobs
            verified = [
                with_logprobs(r, t, alternatives)
                for r, t in zip(rows[: len(tokens)], tokens, strict=True)
            ]
            outputs.append(self._append(seq, verified))
        elapsed = time.perf_counter() - start
        generated = sum(len(o.token_ids) for o in outputs)
        self.stats.throughput.add(generated)
        if spec is not None:
            spec.observe(plan.chunks, proposals, elapsed, generated)
        self._account(plan, elapsed)
        return outputs

    def _draw_batch(
        self, logits: torch.Tensor, sampling: list[tuple[Chunk, int]], proposals: dict
    ) -> dict[int, Sampled]:
        """The next token of every sequence that draws one plainly this step (forks of an
        n > 1 prompt included), by seq_id: one batched draw on the device, one copy back.
        Sequences verifying proposals draw in the speculator."""
        rows, family, row = [], [], 0
        for chunk, count in sampling:
            if chunk.seq.seq_id not in proposals:
                for seq in self._family(chunk.seq, fork=True):
                    rows.append(row)
                    family.append(seq)
            row += count
        if not family:
            return {}
        params = [s.params for s in family]
        drawn = sample_batch(logits[rows], params, [s.generator for s in family])
        return {s.seq_id: d for s, d in zip(family, drawn, strict=True)}

    def _family(self, seq: Sequence, fork: bool = False) -> list[Sequence]:
        """``seq``, and after the prompt of an n > 1 request its n - 1 forks (made when
        ``fork``, found after)."""
        siblings = self._requests[seq.request_id]
        if seq.params.n == 1 or seq.output or (len(siblings) > 1 and seq.index != 0):
            return [seq]
        if fork and len(siblings) == 1:
            for i in range(1, seq.params.n):
                self._fork(seq, i)  # joins ``siblings``
        return [s for s in siblings if not s.output]

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        child = self._sequence(parent.request_id, index, parent.prompt, parent.params)
        child.table = parent.table.fork()
        child.computed, child.draft_computed = parent.computed, parent.draft_computed
        child.arrival = parent.arrival
        self._requests[parent.request_id].append(child)
        self.scheduler.fork(parent, child)
        return child

    def _append(self, seq: Sequence, drawn: list[Sampled]) -> RequestOutput:
        """Append drawn tokens until one ends the sequence; the output to stream."""
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats.ttft_seconds.append(now - seq.arrival)
            self.stats.ttft_hist.observe(now - seq.arrival)
        reason = None
        for token in drawn:
            reason = self._push(seq, token)
            if reason is not None:
                break
        if reason is not None:
            if seq.detokenizer is not None:
                seq.detokenizer.finish(seq.output)
            self.scheduler.finish(seq, reason)
            if len(seq.output) > 1:
                tpot = (now - seq.first_token_at) / (len(seq.output) - 1)
                self.stats.tpot_seconds.append(tpot)
                self.stats.tpot_hist.observe(tpot)
        return self._emit(seq)

    def _push(self, seq: Sequence, drawn: Sampled) -> str | None:
        """Append one token; the finish reason if it ends the sequence."""
        params = seq.params
        if drawn.token in params.stop_token_ids or (
            drawn.token == self.eos_id and not params.ignore_eos
        ):
            return "stop"
        seq.output.append(drawn.token)
        if drawn.logprob is not None:
            seq.logprobs.append({"token": drawn.token, "logprob": drawn.logprob, "top": drawn.top})
        self.stats.generated_tokens += 1
        if seq.detokenizer is not None and seq.detokenizer.push(seq.output):
            return "stop"  # a stop string
        if len(seq.output) >= params.max_tokens or len(seq.tokens) >= self.max_context:
            return "length"
        return None

    def _emit(self, seq: Sequence) -> RequestOutput:
        """The tokens and text not yet streamed; text that could still become a stop string
        is held back until the next token decides (the detokenizer holds back incomplete
        characters)."""
        finished = seq.status is Status.FINISHED
        text_end = len(seq.text)
        if not finished:
            hold = max((len(s) - 1 for s in seq.params.stop), default=0)
            text_end = max(len(seq.text) - hold, seq.sent_text)
        out = RequestOutput(
            seq.request_id,
            seq.index,
            seq.output[seq.sent_tokens :],
            seq.text[seq.sent_text : text_end],
            seq.logprobs[seq.sent_tokens :],
            finished,
            seq.finish_reason,
            len(seq.prompt),
            len(seq.output),
        )
        seq.sent_tokens, seq.sent_text = len(seq.output), text_end
        if finished and all(s.status is Status.FINISHED for s in self._requests[seq.request_id]):
            del self._requests[seq.request_id]
        return out

    def _account(self, plan: Plan, elapsed: float) -> None:
        stats = self.stats
        stats.steps += 1
        stats.step_seconds.append(elapsed)
        stats.busy_seconds += elapsed
        stats.prompt_tokens += sum(
            max(min(c.start + c.length, len(c.seq.prompt)) - c.start, 0) for c in plan.chunks
        )
        keys = sum(c.length * (c.start + c.length) for c in plan.chunks)
        self._cost_samples.append((plan.tokens, keys, len(plan.chunks), elapsed))
        target = self.scheduler.config.tpot_s
        if target is not None:
            self._adjust_headroom(plan, elapsed, target)
        if target is not None and elapsed > target:
            if plan.over_bound:
                stats.bound_misses[plan.over_bound] += 1
            elif plan.predicted_s is not None and plan.predicted_s <= target:
                stats.bound_misses["step-time model underestimated"] += 1
            else:
                stats.bound_misses["no step-time model yet"] += 1
        if target is not None and stats.steps % REFIT_EVERY == 0 and len(self._cost_samples) > 8:
            self.scheduler.cost = StepCostModel.fit(self._calibration + list(self._cost_samples))

    def _adjust_headroom(self, plan: Plan, elapsed: float, target: float) -> None:
        """Plan steps tighter after one the model let run over (5% each), relax slowly
        (0.5% a step) while steps land under the target."""
        scheduler = self.scheduler
        if plan.over_bound or plan.predicted_s is None:
            return
        if elapsed > target:
            scheduler.headroom = max(0.5, scheduler.headroom * 0.95)
        else:
            scheduler.headroom = min(1.0, scheduler.headroom * 1.005)

    # -- whole batches ---------------------------------------------------------------------
    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[list[Completion]]:
        """Run ``prompts`` to completion (continuously batched); n completions each."""
        ids = [self.add_request(p, params) for p in prompts]
        results: dict[str, dict[int, Completion]] = {i: {} for i in ids}
        while self.has_work():
            for out in self.step():
                if out.request_id not in results:
                    continue
                done = results[out.request_id].setdefault(out.index, Completion([], "", None))
                done.token_ids += out.token_ids
                done.text += out.text
                done.logprobs += out.logprobs
                done.finish_reason = out.finish_reason
        return [[results[i][k] for k in sorted(results[i])] for i in ids]

    def kv_usage(self) -> tuple[int, int]:
        return self.allocator.used, self.allocator.num_blocks
