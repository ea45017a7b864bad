"""The engine: requests in, tokens out, one scheduler step at a time.

``Engine.step()`` is the step contract (:mod:`moegpt.serve.step`) and nothing else: the
scheduler plans the step as plain data, the model runner executes it, the scheduler takes in
what it drew. Its outputs are tokens; an :class:`~moegpt.serve.output.OutputProcessor` turns
them into text where they are consumed (``generate()`` here; the event loop in
:class:`~moegpt.serve.async_engine.AsyncEngine`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moegpt.chat import ChatTemplate
from moegpt.config import ServeConfig
from moegpt.console import stderr
from moegpt.errors import UserError
from moegpt.memory import gib, kv_budget_bytes
from moegpt.model import Transformer
from moegpt.model.vision import VisionLanguageModel
from moegpt.serve.blocks import BlockAllocator, BlockTable
from moegpt.serve.calibrate import calibrate, warm_up_packed_steps
from moegpt.serve.lookahead import LookaheadPolicy
from moegpt.serve.media import visual_bytes_per_image
from moegpt.serve.output import OutputProcessor
from moegpt.serve.paged import bytes_per_token
from moegpt.serve.runner import (
    Forward,
    Launched,
    ModelRunner,
    Proposer,
    build_forward,
    context_limit,
)
from moegpt.serve.scheduler import Scheduler, SchedulerConfig
from moegpt.serve.sequence import SamplingParams, Sequence
from moegpt.serve.speculative import DraftProposer, NgramProposer, check_draft
from moegpt.serve.stats import EngineStats
from moegpt.serve.step import RequestOutput, RunnerOutput, SchedulerOutput
from moegpt.serve.tensor_parallel import TensorParallelForward, TensorParallelGroups

__all__ = ["Completion", "Engine", "RequestOutput"]


@dataclass
class _InFlight:
    launched: Launched
    started: float
    host_seconds: float  # planning and launching it, before the device ran it
    prompt_lengths: dict[int, int]


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


def folder_chat_template(path: str | Path, tokenizer: Any) -> ChatTemplate | None:
    """The chat template of a model folder's tokenizer_config.json (None without one)."""
    return ChatTemplate.from_folder(path, tokenizer) if tokenizer is not None else None


def weights_dtype(config: ServeConfig, device: torch.device | str) -> torch.dtype | None:
    """The dtype ``serve.dtype`` asks for on ``device``; None keeps the folder's own."""
    if config.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return getattr(torch, config.dtype)


def _dtype(model: Transformer) -> torch.dtype:
    return next(model.parameters()).dtype


def kv_cache_blocks(
    model: Transformer, config: ServeConfig, extra_token_bytes: int = 0, reserved_bytes: int = 0
) -> tuple[int, str]:
    """KV-cache blocks for ``model``, sized by memory and never by ``max_seq_len`` alone, and
    where the size comes from, in words. On a GPU: as many as fit the budget (90% of the free
    memory); on CPU: enough for ``max_batch_size`` sequences of ``serve.max_model_len`` (the
    model's context by default), at most what fits the budget (see :mod:`moegpt.memory`).
    ``serve.num_kv_blocks`` must fit it too.
    ``extra_token_bytes``: another cache sharing the block tables (a draft model's);
    ``reserved_bytes``: what else the budget must hold (requests' image caches)."""
    device = next(model.parameters()).device
    token_bytes = bytes_per_token(model.config, _dtype(model), config.tp) + extra_token_bytes
    block_bytes = token_bytes * config.block_size
    budget, source = kv_budget_bytes(device)
    fits = max(budget - reserved_bytes, 0) // block_bytes
    words = f"budget {gib(budget)}: {source}"
    if reserved_bytes:
        words += f"; {gib(reserved_bytes)} of it kept for image caches"
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
        needed = config.max_batch_size * -(-context_limit(model, config) // config.block_size)
        fits = min(fits, needed)
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
        tp: TensorParallelGroups | None = None,
        draft: Transformer | None = None,
        vision: VisionLanguageModel | None = None,
    ) -> None:
        """``tp``: ``model`` is this rank's tensor-parallel shard and the groups' other
        ranks run :func:`moegpt.serve.tensor_parallel.follow` (see ``open_tensor_parallel``).
        ``draft``: a smaller model proposing tokens for speculative decoding (``config.ngram``
        proposes from n-grams instead). ``vision``: the vision model ``model`` is the
        language model of; requests may then send images."""
        started = time.perf_counter()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_template: ChatTemplate | None = None  # the model folder's, for chat requests
        self.config = config or ServeConfig()
        self.eos_id = eos_id
        self.device = next(model.parameters()).device
        # Settings are checked before the forward exists: under tensor parallelism its decode
        # graphs hold collectives, and a rank that left without closing them would hang.
        if draft is not None:
            check_draft(model, draft)
        self.overlap = self._overlaps(speculating=draft is not None or self.config.ngram)
        if vision is not None and (tp is not None or vision.lm is not model):
            raise ValueError("a vision engine runs in one process, over the vision model's LM")
        self.vision = vision
        draft_bytes = 0 if draft is None else bytes_per_token(draft.config, _dtype(draft))
        self.image_cache_bytes = 0  # room for every running request's images
        if vision is not None:
            per_image = visual_bytes_per_image(vision)
            # With overlap, a finished request's images stay alive until the step launched
            # before its end was known has run, while the requests admitted in its place encode
            # theirs: up to twice the batch's images at once.
            requests = self.config.max_batch_size * (2 if self.overlap else 1)
            self.image_cache_bytes = requests * self.config.max_images * per_image
        blocks, budget = kv_cache_blocks(model, self.config, draft_bytes, self.image_cache_bytes)
        sized = dataclasses.replace(self.config, num_kv_blocks=blocks)
        forward = build_forward(model, sized, tp and tp.device, draft_bytes, vision)
        self.allocator = BlockAllocator(forward.cache.num_blocks, self.config.block_size)
        # A sequence must fit the cache alone (else preempting it could never make room).
        capacity = self.allocator.num_blocks * self.config.block_size
        requested = context_limit(model, self.config)
        self.max_context = min(requested, capacity)
        if capacity < requested:
            source = "serve.max_model_len" if self.config.max_model_len else "model.max_seq_len"
            stderr.print(
                f"serve: {source} ({requested:,}) does not fit the KV cache ({budget}); "
                f"prompt plus output are capped at {capacity:,} tokens",
                highlight=False,
            )
        self.forward: Forward = forward if tp is None else TensorParallelForward(forward, tp)
        proposer, lookahead = self._speculation(draft)
        self.runner = ModelRunner(self.forward, self.device, proposer, vision)
        self._in_flight: _InFlight | None = None  # the step the device is running
        self._last_taken_in = 0.0
        tpot = self.config.tpot_ms / 1e3 if self.config.tpot_ms else None
        ttft = self.config.ttft_ms / 1e3 if self.config.ttft_ms else None
        self.scheduler = Scheduler(
            SchedulerConfig(
                self.config.max_batch_size, self.config.max_tokens_per_step, tpot, ttft
            ),
            self.allocator,
            max_context=self.max_context,
            eos_id=eos_id,
            lookahead=lookahead,
        )
        self.stats = EngineStats()
        if forward.graphs is not None and forward.graphs.compiled:
            warm_up_packed_steps(self.forward, self.allocator)
        adaptive = lookahead is not None and self.config.speculation == "adaptive"
        if (tpot or ttft or adaptive) and self.config.calibrate:
            self.scheduler.cost, self.scheduler.calibration = calibrate(
                self.forward, self.allocator, self.scheduler.config, self.max_context
            )
        self._requests: dict[str, int] = {}  # request id -> its samples not yet finished
        # unseeded requests draw their seeds from here: from the OS, so no two runs repeat
        self._seed_rng = torch.Generator()
        self._seed_rng.seed()
        # Cache, graphs and calibration; ``from_folder`` adds the load.
        self.startup_seconds = time.perf_counter() - started

    def _speculation(
        self, draft: Transformer | None
    ) -> tuple[Proposer | None, LookaheadPolicy | None]:
        config = self.config
        if draft is not None:  # checked against the model before the forward was built
            proposer = DraftProposer(draft, config, self.allocator.num_blocks)
            return proposer, LookaheadPolicy(config, draft.config.max_seq_len)
        if config.ngram:
            return NgramProposer(config.ngram_max, config.ngram_min), LookaheadPolicy(config)
        return None, None

    def _overlaps(self, speculating: bool) -> bool:
        mode = self.config.overlap
        if mode == "on" and speculating:
            raise UserError("serve.overlap: on needs each step's tokens on the host to speculate")
        return mode == "on" or (mode == "auto" and not speculating and self.device.type == "cuda")

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
        from moegpt.weights import load, load_vision, load_vision_config

        if config is not None and config.tp > 1:
            raise UserError("serve.tp: a tensor-parallel engine opens with open_tensor_parallel")
        started = time.perf_counter()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer, eos_id = folder_tokenizer(path)
        vision = None
        settings = config or ServeConfig()
        verify, dtype = settings.verify_weights, weights_dtype(settings, device)
        if load_vision_config(path).enabled:
            vision = load_vision(path, device=device, dtype=dtype, verify=verify)
            model = vision.lm
        else:
            model = load(path, device=device, dtype=dtype, verify=verify)
        draft = load_draft(path, config, model) if config is not None else None
        engine = cls(model, tokenizer, config, eos_id=eos_id, draft=draft, vision=vision)
        engine.chat_template = folder_chat_template(path, tokenizer)
        engine.startup_seconds = time.perf_counter() - started
        return engine

    def describe(self) -> str:
        """One line on how the engine was set up: its KV cache, decode graphs, step-time
        model and overlap, and how long starting it took."""
        blocks, size = self.allocator.num_blocks, self.config.block_size
        cache = self.forward.cache
        nbytes = (cache.k.numel() + cache.v.numel()) * cache.k.element_size()
        graphs = self.forward.graphs
        parts = [
            f"KV cache {blocks:,} blocks of {size} tokens ({nbytes / 2**20:,.1f} MiB)",
            (
                f"{graphs.captured} {'compiled ' if graphs.compiled else ''}decode graphs"
                if graphs is not None
                else "no decode graphs"
            ),
            "step-time model calibrated" if self.scheduler.cost else "no step-time model",
            f"overlap {'on' if self.overlap else 'off'}",
        ]
        if self.vision is not None:
            room = self.image_cache_bytes / 2**20
            parts.append(f"up to {self.config.max_images} images a request ({room:,.1f} MiB kept)")
        return ", ".join(parts) + f"; ready in {self.startup_seconds:.1f} s"

    def close(self) -> None:
        """Release tensor-parallel followers and the decode graphs."""
        self.forward.close()

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
        images: list[torch.Tensor] | None = None,
    ) -> str:
        """Queue a request; ``images`` (grey uint8 squares of the model's image size, see
        :func:`moegpt.serve.media.decode_image`) stand, in order, for the prompt's
        ``<|image|>`` tokens."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_prompt(ids, room=min(params.max_tokens, 1))
        stacked = self.check_images(ids, images or [])
        if self.vision is not None:  # an image the model names has no pixels: stop there
            stops = (*params.stop_token_ids, self.vision.image_token_id)
            params = dataclasses.replace(params, stop_token_ids=stops)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise UserError(f"request_id: {request_id!r} is already running")
        seed = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(2**62, (), generator=self._seed_rng))
        seq = Sequence(
            self.scheduler.new_seq_id(),
            request_id,
            0,
            ids,
            params,
            BlockTable(self.allocator),
            seed,
            images=stacked,
        )
        self._requests[request_id] = params.n
        self.scheduler.add(seq)
        return request_id

    def check_images(self, ids: list[int], images: list[torch.Tensor]) -> torch.Tensor | None:
        """The request's images as one (count, H, W) tensor, once they match its markers."""
        if self.vision is None:
            if images:
                raise UserError("images: this model has no vision encoder (a text model)")
            return None
        markers = ids.count(self.vision.image_token_id)
        if len(images) > self.config.max_images:
            raise UserError(
                f"images: {len(images)} images, more than the {self.config.max_images} a "
                "request may send (serve.max_images)"
            )
        if markers != len(images):
            raise UserError(
                f"images: the prompt marks {markers} image(s) with <|image|> but {len(images)} "
                "were sent"
            )
        size = self.vision.config.image_size
        for i, image in enumerate(images):
            if image.dtype != torch.uint8 or tuple(image.shape) != (size, size):
                raise UserError(f"images[{i}]: expected a {size}x{size} grey uint8 image")
        return torch.stack(images) if images else None

    def check_prompt(self, ids: list[int], room: int = 1) -> None:
        """A prompt the engine can run: known tokens, ``room`` left to generate (0 for a
        prompt scored alone)."""
        limit = self.max_context
        if not ids:
            raise UserError("prompt: empty")
        if len(ids) + room > limit:
            what = "KV cache"
            if limit == self.config.max_model_len:
                what = "request limit (serve.max_model_len)"
            elif limit == self.model.config.max_seq_len:
                what = "context"
            if room:
                raise UserError(
                    f"prompt: {len(ids)} tokens leave no room in the {limit}-token {what}"
                )
            raise UserError(f"prompt: {len(ids)} tokens exceed the {limit}-token {what}")
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise UserError(f"prompt: token ids must be in 0..{self.model.config.vocab_size - 1}")

    def abort(self, request_id: str) -> None:
        """Cancel a request at any point; its blocks are freed at once."""
        self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)

    def finish(self, request_id: str, index: int, reason: str = "stop") -> None:
        """End one sequence of a request (a stop string found in its text)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.request_id == request_id and seq.index == index:
                self.scheduler.finish(seq, reason)
                self._one_finished(request_id)
                return

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update: the tokens each sampled sequence gained this step.

        With ``overlap`` the step is launched, not waited for: the tokens returned are the
        previous step's, taken in after this one was planned and launched, so the host's
        work hides behind the device's."""
        started = time.perf_counter()  # the latency bound covers the whole step
        scheduled = self.scheduler.schedule()
        self.stats.preemptions += len(scheduled.preempted)
        prompt_lengths = {s.seq_id: len(s.prompt) for s in self.scheduler.running}
        try:
            launched = self.runner.launch(scheduled) if scheduled.chunks else None
        except BaseException:
            self.scheduler.discard(scheduled)
            raise
        host = time.perf_counter() - started
        step = None if launched is None else _InFlight(launched, started, host, prompt_lengths)
        if not self.overlap:
            return [] if step is None else self._take_in(step)
        previous, self._in_flight = self._in_flight, step
        return [] if previous is None else self._take_in(previous, host)

    def _take_in(self, step: _InFlight, host_since: float = 0.0) -> list[RequestOutput]:
        """Wait for a launched step's tokens and hand them to the scheduler. ``host_since``:
        the seconds spent planning and launching the next step before this one was taken in
        (with overlap), which are that step's cost, not this one's."""
        try:
            result = self.runner.collect(step.launched)
        except BaseException:
            self.scheduler.discard(step.launched.out)
            raise
        now = time.perf_counter()
        # Overlapped steps follow each other: a step's time starts where the last one ended,
        # plus its own planning and launch (done while the step before it ran), less the
        # next one's. An eager step's launch alone can cost several decode steps: charged to
        # the step before it, it made decodes look slow and mixed steps cheap.
        origin = max(step.started, self._last_taken_in)
        elapsed = now - origin - host_since
        if origin > step.started:
            elapsed += step.host_seconds
        self._last_taken_in = now
        scheduled = step.launched.out
        outputs = self.scheduler.update(scheduled, result, elapsed)
        self._account(scheduled, result, outputs, elapsed, step.prompt_lengths)
        for out in outputs:
            if out.finished:
                self._one_finished(out.request_id)
        return outputs

    def _one_finished(self, request_id: str) -> None:
        """A sample of the request ended; the request is forgotten after its last."""
        left = self._requests.get(request_id)
        if left == 1:
            del self._requests[request_id]
        elif left is not None:
            self._requests[request_id] = left - 1

    def _account(
        self,
        scheduled: SchedulerOutput,
        result: RunnerOutput,
        outputs: list[RequestOutput],
        elapsed: float,
        prompt_lengths: dict[int, int],
    ) -> None:
        stats = self.stats
        stats.steps += 1
        stats.step_seconds.append(elapsed)
        stats.busy_seconds += elapsed
        stats.propose_seconds += result.propose_seconds
        for seq_id, proposed in result.proposed.items():
            stats.spec.record(proposed, len(result.sampled[seq_id]) - 1)
        stats.prompt_tokens += sum(
            max(min(c.start + c.length, prompt_lengths[c.seq_id]) - c.start, 0)
            for c in scheduled.chunks
        )
        generated = sum(len(o.token_ids) for o in outputs)
        stats.generated_tokens += generated
        stats.throughput.add(generated)
        for out in outputs:
            if out.time_to_first_token is not None:
                stats.ttft_seconds.append(out.time_to_first_token)
                stats.ttft_hist.observe(out.time_to_first_token)
            if out.time_per_output_token is not None:
                stats.tpot_seconds.append(out.time_per_output_token)
                stats.tpot_hist.observe(out.time_per_output_token)
        target = self.scheduler.config.tpot_s
        if target is not None and elapsed > target:
            if scheduled.over_bound:
                stats.bound_misses[scheduled.over_bound] += 1
            elif scheduled.predicted_s is not None and scheduled.predicted_s <= target:
                stats.bound_misses["step-time model underestimated"] += 1
            else:
                stats.bound_misses["no step-time model yet"] += 1

    def text_step(self, processors: dict[str, OutputProcessor]) -> list[RequestOutput]:
        """One step with its outputs turned into text by each request's processor, and the
        sequences a stop string ended finished: for callers on the stepping thread
        (``generate()``, the CLI). Outputs of requests without a processor are dropped."""
        outputs = []
        for raw in self.step():
            processor = processors.get(raw.request_id)
            out, stopped = processor.process(raw) if processor else (None, False)
            if stopped:
                self.finish(raw.request_id, raw.index)
            if out is not None:
                outputs.append(out)
        return outputs

    # -- whole batches ---------------------------------------------------------------------
    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[list[Completion]]:
        """Run ``prompts`` to completion (continuously batched); n completions each."""
        params = params or SamplingParams()
        ids = [self.add_request(p, params) for p in prompts]
        results: dict[str, dict[int, Completion]] = {i: {} for i in ids}
        processors = {i: OutputProcessor(self.tokenizer, params.stop) for i in ids}
        while self.has_work():
            for out in self.text_step(processors):
                done = results[out.request_id].setdefault(out.index, Completion([], "", None))
                done.token_ids += out.token_ids
                done.text += out.text
                done.logprobs += out.logprobs
                done.finish_reason = out.finish_reason
        return [[results[i][k] for k in sorted(results[i])] for i in ids]

    def kv_usage(self) -> tuple[int, int]:
        return self.allocator.used, self.allocator.num_blocks
