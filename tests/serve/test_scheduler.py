"""The scheduler alone (no model): budgets, FCFS order, preemption order, the latency bound."""

from __future__ import annotations

from moegpt.serve.blocks import BlockAllocator, BlockTable
from moegpt.serve.scheduler import Plan, Scheduler, SchedulerConfig, StepCostModel
from moegpt.serve.sequence import SamplingParams, Sequence, Status


def make(scheduler: Scheduler, seq_id: int, prompt_len: int, arrival: float = 0.0) -> Sequence:
    seq = Sequence(
        seq_id,
        f"r{seq_id}",
        0,
        [1] * prompt_len,
        SamplingParams(max_tokens=100),
        BlockTable(scheduler.allocator),
        arrival=arrival,
    )
    scheduler.add(seq)
    return seq


def run(scheduler: Scheduler) -> Plan:
    """What the engine does after a step: the scheduled tokens are computed, and every chunk
    that reached its sequence's end samples one token."""
    plan = scheduler.schedule()
    for chunk in plan.chunks:
        chunk.seq.computed = chunk.start + chunk.length
        if chunk.seq.computed == len(chunk.seq.tokens):
            chunk.seq.output.append(7)
    return plan


def test_token_budget_and_fcfs_with_chunked_prefill() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_tokens_per_step=10), BlockAllocator(64, 4))
    a, b, c = make(s, 0, 6), make(s, 1, 7), make(s, 2, 3)
    plan = run(s)
    assert [(ch.seq.seq_id, ch.start, ch.length) for ch in plan.chunks] == [(0, 0, 6), (1, 0, 4)]
    assert plan.limited_by == "token budget"
    plan = run(s)  # a decodes, b finishes its prompt, c starts: arrival order kept
    assert [(ch.seq.seq_id, ch.start, ch.length) for ch in plan.chunks] == [
        (0, 6, 1),
        (1, 4, 3),
        (2, 0, 3),
    ]
    assert all(p.tokens <= 10 for p in (plan,))
    assert [x.status for x in (a, b, c)] == [Status.RUNNING] * 3


def test_batch_size_limit() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_tokens_per_step=100), BlockAllocator(64, 4))
    for i in range(3):
        make(s, i, 2)
    plan = run(s)
    assert len(plan.chunks) == 2 and plan.limited_by == "batch size"


def test_admission_waits_for_free_blocks() -> None:
    s = Scheduler(SchedulerConfig(), BlockAllocator(3, 4))
    make(s, 0, 8)  # 2 blocks
    make(s, 1, 8)  # 2 more: only 1 left
    plan = run(s)
    assert [c.seq.seq_id for c in plan.chunks] == [0] and plan.limited_by == "kv blocks"


def test_newest_running_sequence_is_preempted_and_comes_back_first() -> None:
    s = Scheduler(SchedulerConfig(), BlockAllocator(4, 4))
    old, new = make(s, 0, 8), make(s, 1, 8)
    run(s)  # both prefilled: 4 blocks used, each now needs a 3rd block for token 9
    assert s.allocator.free == 0
    plan = run(s)
    assert plan.preempted == [new] and [c.seq for c in plan.chunks] == [old]
    assert new.status is Status.WAITING and new.computed == 0 and s.waiting[0] is new
    s.finish(old, "stop")
    plan = run(s)  # recomputed: its prompt and the token it had generated
    assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [(1, 0, 9)]


def test_abort_frees_blocks_everywhere() -> None:
    s = Scheduler(SchedulerConfig(max_tokens_per_step=8), BlockAllocator(8, 4))
    make(s, 0, 8)
    make(s, 1, 8)
    run(s)
    s.abort("r0")
    s.abort("r1")  # still waiting
    assert s.allocator.free == 8 and not s.has_work()


def test_latency_bound_sizes_the_batch() -> None:
    # 1 ms per step plus 1 ms per token: a 5 ms target fits 4 decodes
    cost = StepCostModel(base=1e-3, per_token=1e-3, per_key=0.0)
    s = Scheduler(SchedulerConfig(tpot_s=5e-3), BlockAllocator(64, 4), cost)
    seqs = [make(s, i, 1) for i in range(6)]
    for _ in range(3):  # admission, then decodes: never more than the bound allows
        plan = run(s)
        assert len(plan.chunks) == 4 and plan.limited_by == "latency bound"
        assert plan.predicted_s <= 5e-3
        assert [c.seq for c in plan.chunks] == seqs[:4]
    assert list(s.waiting) == seqs[4:]  # without a TTFT target, newcomers wait


def test_latency_bound_counts_per_sequence_cost() -> None:
    # 1 ms per step, 0.5 ms per token and 0.5 ms per sequence: a 5 ms target fits 4 decodes
    cost = StepCostModel(base=1e-3, per_token=5e-4, per_key=0.0, per_sequence=5e-4)
    s = Scheduler(SchedulerConfig(tpot_s=5e-3), BlockAllocator(64, 4), cost)
    for i in range(6):
        make(s, i, 1)
    plan = run(s)
    assert len(plan.chunks) == 4 and plan.predicted_s <= 5e-3


def test_latency_bound_shrinks_a_prefill_chunk() -> None:
    cost = StepCostModel(base=0.0, per_token=1e-3, per_key=0.0)
    s = Scheduler(SchedulerConfig(tpot_s=10e-3), BlockAllocator(64, 4), cost)
    make(s, 0, 40)
    plan = run(s)
    assert plan.chunks[0].length <= 10 and plan.predicted_s <= 10e-3


def test_late_prompt_jumps_the_bound_for_its_first_token() -> None:
    clock = [0.0]
    cost = StepCostModel(base=1e-3, per_token=1e-3, per_key=0.0)
    s = Scheduler(
        SchedulerConfig(tpot_s=3e-3, ttft_s=0.1),
        BlockAllocator(64, 4),
        cost,
        clock=lambda: clock[0],
    )
    for i in range(2):
        make(s, i, 1)
    run(s)
    late = make(s, 9, 1, arrival=0.0)
    clock[0] = 1.0  # it has waited 1 s for a 0.1 s target
    plan = run(s)
    assert late in [c.seq for c in plan.chunks] and plan.over_bound == "time-to-first-token"


def test_cost_model_fit_recovers_coefficients() -> None:
    truth = StepCostModel(2e-3, 5e-5, 1e-8, 3e-4)
    samples = [
        (t, k, n, truth.predict(t, k, n))
        for t in (1, 8, 64, 512)
        for k in (10, 1000, 99999)
        for n in (1, 7)
    ]
    fitted = StepCostModel.fit(samples)
    for got, want in zip(
        (fitted.base, fitted.per_token, fitted.per_key, fitted.per_sequence),
        (2e-3, 5e-5, 1e-8, 3e-4),
        strict=True,
    ):
        assert abs(got - want) <= 1e-6 * max(want, 1e-3)
