"""Speculative decoding: greedy output is the target's token for token (draft model and
n-grams, alone and in a batch with non-speculating requests); sampled output follows the
target's distribution (a chi-square test that a wrong acceptance rule fails); the caches hold
exactly the accepted tokens' keys and values; nothing leaks."""

from __future__ import annotations

import random

import pytest
import torch

from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.model import KVCache, Transformer
from moegpt.serve.engine import Engine
from moegpt.serve.lookahead import SpeculationGate
from moegpt.serve.sampler import Proposal, accept, verify_batch
from moegpt.serve.sequence import SamplingParams
from moegpt.serve.speculative import NgramProposer
from tests.conftest import small_config
from tests.serve.test_engine import mixed_requests, reference_greedy

# chi-square 0.1% tails by degrees of freedom
CHI2_999 = {5: 20.52, 7: 24.32}


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0, "a token the target never draws was emitted"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def broken_accept(target, proposed, lengths, proposal_probs, generators):
    """The rule the seed suspects: accept any proposal the target does not rule out."""
    rows, width = proposed.shape
    kept = target[:, :width].gather(2, proposed[..., None]).squeeze(-1) > 0
    accepted = kept.long().cumprod(dim=1).sum(dim=1)
    last = torch.multinomial(target[torch.arange(rows), accepted], 1).squeeze(1)
    tokens = torch.cat([proposed, last[:, None]], dim=1)
    span = torch.arange(width + 1)
    tokens = torch.where(span < accepted[:, None], tokens, -1)
    return torch.where(span == accepted[:, None], last[:, None], tokens), accepted


def emitted_counts(rule, trials: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-0 and position-1 emitted tokens over many verifications of k = 2 proposals
    drawn from p against fixed target rows q (independent of the prefix, so each emitted
    position must follow its own row); the trials verify as one batch."""
    torch.manual_seed(0)
    q = torch.tensor(
        [[0.4, 0.3, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.5, 0.1, 0.1, 0.1], [1 / 6] * 6]
    )
    p = torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    proposed = torch.stack([torch.multinomial(p[i], trials, replacement=True) for i in (0, 1)], 1)
    tokens, _ = rule(
        q.expand(trials, 3, 6),
        proposed,
        [2] * trials,
        p.expand(trials, 2, 6),
        [None] * trials,
    )
    first = torch.bincount(tokens[:, 0], minlength=6).float()
    second = torch.bincount(tokens[:, 1][tokens[:, 1] >= 0], minlength=6).float()
    return first, second, q


def test_acceptance_rule_keeps_the_target_distribution_and_a_wrong_rule_fails() -> None:
    first, second, q = emitted_counts(accept)
    assert chi_square(first, q[0]) < CHI2_999[5]
    assert chi_square(second, q[1]) < CHI2_999[5]
    bad_first, _, _ = emitted_counts(broken_accept)
    assert chi_square(bad_first, q[0]) > 10 * CHI2_999[5]


def test_point_mass_proposals_greedy_rows_and_ragged_lengths() -> None:
    q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    greedy = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # argmax 1, 0, 2
    target = torch.stack([q, greedy, greedy, greedy])
    proposed = torch.tensor([[1, 1], [1, 0], [1, 2], [1, 9 % 3]])
    lengths = [2, 2, 2, 1]  # the last proposes one token: its row 1 is the bonus
    generators = [torch.Generator().manual_seed(1), None, None, None]
    tokens, accepted = accept(target, proposed, lengths, None, generators)
    # an n-gram proposal (point mass): token 1 has q = 1, kept; then token 1 has q = 0
    assert accepted[0] == 1 and tokens[0, 0] == 1 and tokens[0, 1] in (0, 2)
    assert tokens[0, 2] == -1
    assert tokens[1].tolist() == [1, 0, 2] and accepted[1] == 2  # all kept, then the bonus
    assert tokens[2].tolist() == [1, 0, -1] and accepted[2] == 1  # rejected at 2: argmax 0
    assert tokens[3].tolist() == [1, 0, -1] and accepted[3] == 1  # its bonus is row 1's argmax


def test_a_seeded_row_verifies_the_same_whatever_the_others_propose() -> None:
    """A seeded row draws as many uniforms as it proposed, not as the batch's widest row:
    its outcome and its generator's state after do not depend on its neighbours."""
    torch.manual_seed(0)
    q = torch.rand(2, 4, 6).softmax(dim=-1)
    p = torch.rand(2, 3, 6).softmax(dim=-1)
    proposed = torch.tensor([[2, 0, 0], [1, 4, 3]])
    outcomes = []
    for others in ([], [1], [3]):  # alone, beside a row of 1, beside a row of 3
        rows, width = 1 + len(others), max([1, *others])
        generator = torch.Generator().manual_seed(5)
        generators = [generator, *[None] * len(others)]
        target, drafts = q[:rows, : width + 1], p[:rows, :width]
        tokens, accepted = accept(target, proposed[:rows, :width], [1, *others], drafts, generators)
        state = generator.get_state()
        outcomes.append((tokens[0, :2].tolist(), int(accepted[0]), state))
    first = outcomes[0]
    for tokens, accepted, state in outcomes[1:]:
        assert (tokens, accepted) == first[:2] and torch.equal(state, first[2])


def test_ngram_lookup_prefers_the_longest_latest_match() -> None:
    ngram = NgramProposer(max_n=3, min_n=1)
    assert ngram._lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]
    assert ngram._lookup([4, 8, 6, 4], 2) == [8, 6]
    assert ngram._lookup([1, 2, 3], 2) == []


@pytest.fixture(scope="module")
def target() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(max_seq_len=128)).eval()


@pytest.fixture(scope="module")
def stranger() -> Transformer:
    """A draft that knows nothing of the target: most proposals are rejected."""
    torch.manual_seed(1)
    return Transformer(small_config(max_seq_len=128, n_layers=1, d_model=16, n_heads=2)).eval()


def run_batch(engine: Engine, requests, speculate_every: int, seed: int) -> list[list[int]]:
    """Greedy requests arriving at random steps; every ``speculate_every``-th may not
    speculate."""
    rng = random.Random(seed)
    pending = list(enumerate(requests))
    got: dict[str, list[int]] = {}
    order = []
    while pending or engine.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i, (prompt, n) = pending.pop(0)
                speculate = i % speculate_every != 0
                params = SamplingParams(max_tokens=n, temperature=0, speculate=speculate)
                order.append(engine.add_request(prompt, params))
                got[order[-1]] = []
        for out in engine.step():
            got[out.request_id] += out.token_ids
    return [got[r] for r in order]


@pytest.mark.parametrize("proposer", ["self", "stranger", "ngram"])
@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_greedy_speculation_is_the_targets_greedy_output(
    target: Transformer, stranger: Transformer, proposer: str, mode: str
) -> None:
    serve = ServeConfig(
        num_kv_blocks=256, block_size=4, ngram=proposer == "ngram", speculation=mode
    )
    draft = {"self": target, "stranger": stranger}.get(proposer)
    engine = Engine(target, config=serve, draft=draft)
    # repetitive prompts give the n-gram proposer something to find
    requests = [(p * 2, n + 8) for p, n in mixed_requests(16, 97, seed=7)]
    got = run_batch(engine, requests, speculate_every=4, seed=8)
    for (prompt, n), tokens in zip(requests, got, strict=True):
        assert tokens == reference_greedy(target, prompt, n)
    spec = engine.stats.spec
    assert engine.allocator.used == 0
    if mode == "fixed":  # adaptive may find speculating not worth it on this machine
        assert spec.proposed > 0 and spec.accepted_at[0] <= spec.proposed_at[0]
    if proposer == "self" and spec.proposed:  # the target as its own draft: all accepted
        assert spec.acceptance_rate == 1.0


@torch.no_grad()
def cached_keys(model: Transformer, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's keys and values of ``tokens`` from a plain contiguous-cache prefill."""
    cache = KVCache.for_model(model, 1, max_len=len(tokens))
    model(torch.tensor([tokens]), cache=cache)
    return cache.k[:, 0].transpose(1, 2), cache.v[:, 0].transpose(1, 2)  # (L, T, kv, d)


def test_rollback_leaves_exactly_the_accepted_tokens_in_both_caches(
    target: Transformer, stranger: Transformer
) -> None:
    engine = Engine(
        target,
        config=ServeConfig(num_kv_blocks=128, block_size=4, speculation="fixed"),
        draft=stranger,
    )
    for prompt, _ in mixed_requests(6, 97, seed=9):
        engine.add_request(prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=3))
    for _ in range(12):
        engine.step()
    assert engine.stats.spec.accepted < engine.stats.spec.proposed  # there were rejections
    draft_cache = engine.runner.proposer.forward.cache
    for seq in engine.scheduler.running:
        drafted = engine.runner.sequences[seq.seq_id].draft_computed
        for model, cache, n in (
            (target, engine.runner.cache, seq.computed),
            (stranger, draft_cache, drafted),
        ):
            slots = torch.tensor(seq.table.slots(0, n))
            k, v = cached_keys(model, seq.tokens[:n])
            torch.testing.assert_close(cache.k[:, slots], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[:, slots], v, rtol=1e-5, atol=1e-5)


def test_no_block_leaks_when_cancelling_mid_speculation(
    target: Transformer, stranger: Transformer
) -> None:
    engine = Engine(
        target,
        config=ServeConfig(num_kv_blocks=40, block_size=4, max_batch_size=8, speculation="fixed"),
        draft=stranger,
    )
    rng = random.Random(4)
    live: list[str] = []
    for added in range(300):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(max_tokens=rng.randint(1, 24), seed=added, n=rng.choice([1, 2]))
        live.append(engine.add_request(prompt, params))
        if rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
    while engine.has_work():
        engine.step()
    assert engine.stats.spec.proposed > 0 and engine.stats.preemptions > 0
    assert engine.allocator.used == 0


def test_sampled_speculation_follows_the_target_distribution() -> None:
    """Third-token marginals of a batch (each request its own seed), with a random draft,
    against the target's exact marginal (enumerated over the first two tokens)."""
    torch.manual_seed(2)
    # Large weights make peaked distributions, so target and draft disagree clearly.
    target = Transformer(small_config(vocab_size=8, max_seq_len=32, init_std=0.6)).eval()
    draft = Transformer(small_config(vocab_size=8, max_seq_len=32, init_std=0.6)).eval()
    prompt = [1, 2, 3]
    engine = Engine(
        target,
        config=ServeConfig(num_kv_blocks=2048, max_batch_size=256, speculation="fixed"),
        draft=draft,
    )
    outs = engine.generate([prompt] * 3000, SamplingParams(max_tokens=3, temperature=1.0))
    counts = torch.zeros(8)
    for (completion,) in outs:
        counts[completion.token_ids[2]] += 1
    assert engine.stats.spec.proposed > 1000
    with torch.no_grad():
        first = target(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        seconds = target(torch.tensor([[*prompt, t] for t in range(8)])).logits[:, -1].softmax(-1)
        pairs = [[*prompt, a, b] for a in range(8) for b in range(8)]
        thirds = target(torch.tensor(pairs)).logits[:, -1].softmax(-1).view(8, 8, 8)
    exact = torch.einsum("a,ab,abc->c", first, seconds, thirds)
    assert chi_square(counts, exact) < CHI2_999[7]


def test_a_draft_with_another_vocabulary_is_refused(target: Transformer) -> None:
    other = Transformer(small_config(vocab_size=50)).eval()
    with pytest.raises(UserError, match="^serve.draft: vocabulary of 50 tokens"):
        Engine(target, config=ServeConfig(num_kv_blocks=16), draft=other)


def test_generate_cli_checks_the_proposer_flags(tmp_path, target: Transformer, capsys) -> None:
    from moegpt.cli import main
    from moegpt.weights import save_model

    save_model(target, tmp_path / "m")
    both = ["generate", str(tmp_path / "m"), "--prompt", "x", "--ngram", "--draft", "d"]
    assert main(both) == 2
    assert "serve.ngram: choose one proposer" in capsys.readouterr().err
    missing = ["generate", str(tmp_path / "m"), "--prompt", "x", "--draft", str(tmp_path / "d")]
    assert main(missing) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_gate_settles_on_the_faster_mode_per_load_level_and_probes() -> None:
    gate = SpeculationGate()
    level = SpeculationGate.bucket(48)
    assert not gate.allows(level)  # nothing measured: run plain first
    gate.record(level, False, 1e-3)
    assert gate.allows(level)  # then try speculating
    gate.record(level, True, 2e-3)  # slower at this load
    decisions = [gate.allows(level) for _ in range(128)]
    assert decisions.count(True) == 2  # only the periodic probes speculate
    gate.record(SpeculationGate.bucket(1), False, 5e-3)
    gate.record(SpeculationGate.bucket(1), True, 2e-3)  # at batch 1 it pays
    assert [gate.allows(1) for _ in range(60)].count(False) == 0
    for _ in range(30):  # speculation slows to within the noise margin: stop
        gate.record(SpeculationGate.bucket(1), True, 4.9e-3)
    assert not gate.allows(1)
    assert gate.allows(None)  # steps with prefill are not gated


def test_verified_tokens_carry_the_target_log_probabilities() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 7)
    best = logits.argmax(dim=-1)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)]
    wrong = (int(best[0, 1]) + 1) % 7
    proposals = [Proposal([int(best[0, 0]), wrong]), Proposal([int(best[1, 0])])]
    first, second = verify_batch(logits, params, proposals, [None, None])
    assert [s.token for s in first] == [int(best[0, 0]), int(best[0, 1])]  # corrected at 1
    assert [s.token for s in second] == [int(best[1, 0]), int(best[1, 1])]  # and a bonus
    reference = logits.log_softmax(dim=-1)
    for position, sampled in enumerate(first):
        assert sampled.logprob == pytest.approx(float(reference[0, position, sampled.token]))
        top = reference[0, position].topk(2)
        assert [t for t, _ in sampled.top] == top.indices.tolist()
        assert [v for _, v in sampled.top] == pytest.approx(top.values.tolist())
    assert all(s.logprob is None for s in second)
