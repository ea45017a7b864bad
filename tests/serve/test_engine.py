"""The engine against a plain no-cache full-recompute reference: batched, chunked and
preempted greedy decoding produces exactly each request's tokens alone; nothing leaks."""

from __future__ import annotations

import random
import time

import pytest
import torch

from moegpt.config import RopeScaling, ServeConfig
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.serve import runner
from moegpt.serve.cost import StepCostModel
from moegpt.serve.engine import Engine
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.sequence import SamplingParams
from tests.conftest import small_config


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(max_seq_len=96)).eval()


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Recompute the whole sequence for every token: no cache, no batch."""
    tokens, out = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
        out.append(token)
        tokens.append(token)
    return out


def run_with_arrivals(engine: Engine, requests: list, seed: int) -> dict[str, list[int]]:
    """Requests join at random steps while others run."""
    rng = random.Random(seed)
    pending = list(requests)
    ids: dict[str, list[int]] = {}
    order: list[str] = []
    while pending or engine.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                prompt, n = pending.pop(0)
                order.append(
                    engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0))
                )
                ids[order[-1]] = []
        for out in engine.step():
            ids[out.request_id] += out.token_ids
    return {i: ids[i] for i in order}


def mixed_requests(count: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(1, 40))], rng.randint(1, 24))
        for _ in range(count)
    ]


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize(
    "serve",
    [
        {"block_size": 16, "num_kv_blocks": 256},  # roomy: pure continuous batching
        {"block_size": 4, "num_kv_blocks": 24, "max_batch_size": 8},  # preemption
        {"block_size": 8, "num_kv_blocks": 128, "max_tokens_per_step": 7},  # chunked prefill
    ],
    ids=["roomy", "preempting", "chunked"],
)
def test_batched_greedy_equals_alone(model: Transformer, serve: dict, overlap: str) -> None:
    """Also with each step planned and launched before the last one's tokens are taken in
    (they reach the next step on the device)."""
    engine = Engine(model, config=ServeConfig(**serve, overlap=overlap))
    requests = mixed_requests(32, model.config.vocab_size, seed=1)
    got = run_with_arrivals(engine, requests, seed=2)
    for (prompt, n), tokens in zip(requests, got.values(), strict=True):
        assert tokens == reference_greedy(model, prompt, n)
    assert engine.allocator.used == 0
    if serve.get("num_kv_blocks") == 24:
        assert engine.stats.preemptions > 0  # the case really preempts


def test_yarn_scaled_model_decodes_as_its_reference_past_the_original_context() -> None:
    """The paged engine builds its rotary tables through the model's forward, so the YaRN
    speeds and attention factor match the no-cache reference at every position."""
    scaling = RopeScaling("yarn", factor=4.0, original_max_seq_len=24)
    torch.manual_seed(0)
    yarn = Transformer(small_config(max_seq_len=96, rope_scaling=scaling)).eval()
    engine = Engine(yarn, config=ServeConfig(block_size=8, num_kv_blocks=128))
    requests = [(list(range(1, 41)), 40), (list(range(5, 60)), 30)]  # up to 85 tokens
    got = run_with_arrivals(engine, requests, seed=3)
    for (prompt, n), tokens in zip(requests, got.values(), strict=True):
        assert tokens == reference_greedy(yarn, prompt, n)


@pytest.mark.parametrize("graphs", [False, True])
def test_padded_decode_attention_agrees(model: Transformer, graphs: bool, monkeypatch) -> None:
    """The GPU fast path (all decodes in one padded SDPA call; with ``graphs``, as on a GPU,
    uniform steps through the decode graphs' buffers and overlapped steps) attends to the
    same keys: in fp32 its rounding differences leave every greedy token unchanged."""
    if graphs:  # the GPU set-up on CPU: the graphs' buffers, run without capture
        monkeypatch.setattr(runner, "graphs_wanted", lambda *_: True)
        monkeypatch.setattr(DecodeGraphs, "capture", lambda self: None)
    # Uncompiled: compilation's own rounding is covered by tests/serve/test_graphs.py.
    config = ServeConfig(
        num_kv_blocks=256,
        decode_attention="padded",
        overlap="on" if graphs else "off",
        compile=False,
    )
    engine = Engine(model, config=config)
    assert not engine.forward.batch_invariant
    assert (engine.forward.graphs is not None) == graphs
    requests = mixed_requests(32, model.config.vocab_size, seed=4)
    got = run_with_arrivals(engine, requests, seed=5)
    for (prompt, n), tokens in zip(requests, got.values(), strict=True):
        assert tokens == reference_greedy(model, prompt, n)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_no_block_leaks_after_cancellations_and_preemptions(
    model: Transformer, overlap: str
) -> None:
    config = ServeConfig(block_size=4, num_kv_blocks=40, max_batch_size=16, overlap=overlap)
    engine = Engine(model, config=config)
    rng = random.Random(3)
    live: list[str] = []
    added = 0
    while added < 1000 or engine.has_work():
        for _ in range(rng.randint(0, 3) if added < 1000 else 0):
            prompt = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 20))]
            n = rng.choice([1, 1, 2])
            params = SamplingParams(max_tokens=rng.randint(1, 16), seed=added, n=n)
            live.append(engine.add_request(prompt, params))
            added += 1
        if live and rng.random() < 0.2:  # cancel anything, running, waiting or done
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
    assert engine.stats.preemptions > 0
    assert engine.allocator.used == 0 and engine.allocator.free == 40
    # The runner forgets every sequence it is told has ended (the last ones are told with
    # the next step), and so reuses their block-table rows: a row per live sequence at most.
    runner = engine.runner
    assert set(runner.sequences) == set(engine.scheduler._gone)
    assert runner._rows_used - len(runner._free_rows) == len(runner.sequences)
    assert runner._rows_used <= 2 * config.max_batch_size


def test_sequences_that_end_before_a_step_with_nothing_to_run_are_forgotten(
    model: Transformer,
) -> None:
    """With overlap, B ends while the step that ends A is in flight: the next step has nothing
    to run, and its news of B's end must still reach the runner (else B's record and its
    block-table row stay forever)."""
    engine = Engine(model, config=ServeConfig(num_kv_blocks=64, overlap="on"))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    while engine.has_work():
        engine.step()
    engine.add_request([4, 5], SamplingParams(max_tokens=1))
    while engine.has_work():
        engine.step()
    assert set(engine.runner.sequences) == set(engine.scheduler._gone)


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_request_id_is_busy_until_its_last_sample_ends(model: Transformer, overlap: str) -> None:
    engine = Engine(model, config=ServeConfig(num_kv_blocks=64, overlap=overlap))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, n=3, seed=0), "r")
    with pytest.raises(UserError, match="request_id: 'r' is already running"):
        engine.add_request([4], SamplingParams(max_tokens=1), "r")
    finished = 0
    while engine.has_work():
        finished += sum(out.finished for out in engine.step())
        if finished < 3:
            with pytest.raises(UserError, match="already running"):
                engine.add_request([4], SamplingParams(max_tokens=1), "r")
    assert finished == 3
    engine.add_request([4], SamplingParams(max_tokens=1), "r")  # free again
    engine.abort("r")
    engine.add_request([5], SamplingParams(max_tokens=1), "r")  # and after an abort


def test_overlapped_steps_draw_the_same_seeded_samples(model: Transformer) -> None:
    """n > 1 samples fork once, at the prompt's end, also when the first token is still in
    flight as the next step is planned: the same seeds give the same tokens either way."""
    requests = mixed_requests(6, model.config.vocab_size, seed=7)
    params = SamplingParams(max_tokens=12, n=3, seed=11, temperature=0.8)
    runs = {}
    for overlap in ("off", "on"):
        engine = Engine(model, config=ServeConfig(num_kv_blocks=96, overlap=overlap))
        runs[overlap] = [
            [c.token_ids for c in completions]
            for completions in engine.generate([p for p, _ in requests], params)
        ]
        assert engine.allocator.used == 0
    assert runs["on"] == runs["off"]
    assert all(len(samples) == 3 for samples in runs["on"])


@torch.no_grad()
def reference_prompt_logprobs(model: Transformer, prompt: list[int]) -> list[float]:
    """log p(prompt[i] | prompt[:i]) for i >= 1 from one no-cache forward."""
    logits = model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    return logits.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize(
    "serve",
    [
        {"block_size": 8, "num_kv_blocks": 128},
        {"block_size": 8, "num_kv_blocks": 128, "max_tokens_per_step": 7},  # chunked prefill
        {"block_size": 4, "num_kv_blocks": 30, "max_batch_size": 8},  # preemption
    ],
    ids=["roomy", "chunked", "preempting"],
)
def test_prompt_logprobs_equal_the_no_cache_forward(
    model: Transformer, serve: dict, overlap: str
) -> None:
    """Scored prompts (alone with max_tokens 0, or before generating) mixed with plain
    requests: each prompt token's log-probability is the full forward's, once, and the
    generated tokens are unchanged; a prompt may fill the whole context when scored alone."""
    engine = Engine(model, config=ServeConfig(**serve, overlap=overlap))
    rng = random.Random(7)
    vocab, context = model.config.vocab_size, model.config.max_seq_len
    requests = []
    for i in range(16):
        length = context if i == 0 else rng.randint(2, 40)
        prompt = [rng.randrange(vocab) for _ in range(length)]
        max_tokens = 0 if i % 3 == 0 else rng.randint(1, 12)
        scored = i % 3 != 2
        params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=scored)
        requests.append((engine.add_request(prompt, params), prompt, max_tokens, scored))
    outputs: dict[str, list] = {rid: [] for rid, *_ in requests}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for rid, prompt, max_tokens, scored in requests:
        outs = outputs[rid]
        assert outs[-1].finished
        assert [t for o in outs for t in o.token_ids] == reference_greedy(model, prompt, max_tokens)
        firsts = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
        if not scored:
            assert firsts == []
            continue
        assert len(firsts) == 1 and firsts[0][0] is None
        assert firsts[0][1:] == pytest.approx(reference_prompt_logprobs(model, prompt), abs=1e-4)
    assert engine.allocator.used == 0
    if serve.get("num_kv_blocks") == 30:
        assert engine.stats.preemptions > 0


def test_scoring_a_prompt_alone_is_checked() -> None:
    with pytest.raises(UserError, match=r"^max_tokens: must be >= 1 \(0 only with prompt_"):
        SamplingParams(max_tokens=0)
    with pytest.raises(UserError, match="^n: must be 1 when max_tokens is 0"):
        SamplingParams(max_tokens=0, prompt_logprobs=True, n=2)


def test_a_scored_prompt_may_fill_the_context_but_not_exceed_it(model: Transformer) -> None:
    engine = Engine(model, config=ServeConfig(num_kv_blocks=64))
    context = model.config.max_seq_len
    alone = SamplingParams(max_tokens=0, prompt_logprobs=True)
    engine.add_request([1] * context, alone)
    with pytest.raises(UserError, match=f"^prompt: {context + 1} tokens exceed the {context}"):
        engine.add_request([1] * (context + 1), alone)
    with pytest.raises(UserError, match=f"^prompt: {context} tokens leave no room"):
        engine.add_request([1] * context, SamplingParams(max_tokens=1, prompt_logprobs=True))


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_step_is_charged_its_own_launch_time(model: Transformer, overlap: str) -> None:
    """With overlap the next step is planned and launched before the last one's tokens come
    in. Launching a step with a prompt chunk is made to cost 0.3 s of host time (as an
    eager launch costs on a GPU); the step-time samples the latency bound learns from must
    charge it to that step, not to the decode step it was launched behind."""
    engine = Engine(model, config=ServeConfig(overlap=overlap, num_kv_blocks=64))
    launch = engine.runner.launch

    def slow_prefill_launch(scheduled):
        if any(c.length > 1 for c in scheduled.chunks):
            time.sleep(0.3)
        return launch(scheduled)

    engine.runner.launch = slow_prefill_launch
    charged: list[tuple[bool, float]] = []
    update = engine.scheduler.update

    def record(out, result, seconds=None):
        charged.append((any(c.length > 1 for c in out.chunks), seconds))
        return update(out, result, seconds)

    engine.scheduler.update = record
    params = SamplingParams(max_tokens=6, temperature=0)
    engine.add_request([1, 2, 3], params)
    for step in range(12):
        if step == 3:
            engine.add_request([4, 5, 6, 7], params)  # a prefill behind running decodes
        engine.step()
    prefills = [seconds for has_prompt, seconds in charged if has_prompt]
    decodes = [seconds for has_prompt, seconds in charged if not has_prompt]
    assert len(prefills) == 2 and len(decodes) >= 6
    assert min(prefills) >= 0.3 and max(decodes) < 0.3


def test_a_step_that_fails_spends_no_slack(model: Transformer) -> None:
    """A step whose launch raises (a CUDA error, say; the server aborts its requests and
    goes on) must not stay counted as spending banked slack, or prompts could never join
    running decodes again."""
    engine = Engine(model, config=ServeConfig(overlap="on", num_kv_blocks=64, tpot_ms=10))
    scheduler = engine.scheduler
    scheduler.cost = StepCostModel(base=1e-3, per_token=0.0, per_key=0.0, per_mixed_step=19e-3)
    params = SamplingParams(max_tokens=20, temperature=0)
    engine.add_request([1, 2, 3], params, "a")
    for _ in range(3):
        engine.step()
    launch = engine.runner.launch

    def failing_prefill(scheduled):
        if any(c.length > 1 for c in scheduled.chunks):
            raise RuntimeError("CUDA error")
        return launch(scheduled)

    engine.runner.launch = failing_prefill
    scheduler.slack = 0.15
    engine.add_request([4, 5, 6, 7], params, "b")  # a prefill beside a's decodes
    with pytest.raises(RuntimeError, match="CUDA error"):
        engine.step()
    for request in ("a", "b"):
        engine.abort(request)
    engine.runner.launch = launch
    while engine.has_work():
        engine.step()
    assert scheduler.banked() == scheduler.slack


def test_serve_dtype_auto_serves_a_float32_export_in_bfloat16_on_a_gpu(text_model) -> None:
    """vLLM's auto: a float32 checkpoint is served in half precision on a GPU; on CPU, where
    bfloat16 matmuls are slow, the folder's own dtype. An explicit setting holds anywhere,
    for the weights and the KV cache alike, and greedy decoding matches the model loaded in
    that dtype directly."""
    from moegpt.serve.engine import weights_dtype
    from moegpt.weights import load

    assert weights_dtype(ServeConfig(), "cuda") is torch.bfloat16
    assert weights_dtype(ServeConfig(), "cpu") is None
    assert weights_dtype(ServeConfig(dtype="float32"), "cuda") is torch.float32
    auto = Engine.from_folder(text_model, ServeConfig(calibrate=False), device="cpu")
    assert next(auto.model.parameters()).dtype is torch.float32
    config = ServeConfig(dtype="bfloat16", calibrate=False)
    engine = Engine.from_folder(text_model, config, device="cpu")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.forward.cache.k.dtype is torch.bfloat16
    prompt = [5, 9, 14, 3]
    done = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0][0]
    model = load(text_model, dtype=torch.bfloat16)
    tokens = torch.tensor([prompt])
    for _ in range(6):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert done.token_ids == tokens[0, len(prompt) :].tolist()
