"""The mixture: exact epochs, rank sharding, resume, validation split, document masks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from moegpt.data.mixture import IGNORE_INDEX, Mixture, MixtureLoader, pack_documents
from moegpt.data.prepare import prepare
from moegpt.data.tokenizer import load_tokenizer
from moegpt.errors import UserError
from tests.data.conftest import make_config


@pytest.fixture
def prepared(corpus: Path):
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    return config


def stream_documents(mixture: Mixture, batches, data_dir: str) -> list[str]:
    """Rebuild the text stream from batches (inputs cover the stream once; padding rows, whose
    labels are all ignored, dropped) and split it into documents at end-of-text."""
    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer.json")
    rows = [
        r
        for b in batches
        for r, lab in zip(b["input_ids"], b["labels"], strict=True)
        if (lab != IGNORE_INDEX).any()
    ]
    ids = torch.cat(rows).tolist()
    ids = [*ids[: mixture.plan.length - 1], mixture.eos_id]
    docs, current = [], []
    for token in ids:
        if token == mixture.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return docs


def test_every_document_is_seen_exactly_epochs_times(prepared) -> None:
    mixture = Mixture.open(prepared.data)
    docs = stream_documents(mixture, list(MixtureLoader(mixture, batch_size=5)), DATA(prepared))
    counts = Counter(docs)
    train_a = {d for d in counts if d.startswith("[a-")}
    train_b = {d for d in counts if d.startswith("[b-")}
    n_a, n_b = (split.documents for split in mixture.splits)
    assert (len(train_a), len(train_b)) == (n_a, n_b)
    assert 23 - n_a >= 1 and 17 - n_b >= 1  # some of each held out
    assert all(counts[d] == 4 for d in train_a)
    assert all(counts[d] == 2 for d in train_b)
    assert len(docs) == n_a * 4 + n_b * 2


def test_each_epoch_is_shuffled_differently(prepared) -> None:
    mixture = Mixture.open(prepared.data)
    a_order = [
        int(i)
        for s, i in zip(mixture.plan.doc_source, mixture.plan.doc_index, strict=True)
        if s == 0
    ]
    n = mixture.splits[0].documents
    epochs = [a_order[k * n : (k + 1) * n] for k in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4


def test_default_weights_spread_sources_over_the_run(prepared) -> None:
    mixture = Mixture.open(prepared.data)
    sources = mixture.plan.doc_source
    half = len(sources) // 2
    share_first = np.mean(sources[:half] == 1)
    share_second = np.mean(sources[half:] == 1)
    assert abs(share_first - share_second) < 0.1


def test_explicit_weights_front_load_the_heavier_source(corpus: Path) -> None:
    config = make_config(corpus, "--data.sources.0.weight", "1", "--data.sources.1.weight", "9")
    prepare(config, log=lambda m: None)
    mixture = Mixture.open(config.data)
    sources = mixture.plan.doc_source
    first_quarter = sources[: len(sources) // 4]
    assert np.mean(first_quarter == 1) > 0.6  # b first, though it has fewer planned tokens
    n_a, n_b = (split.documents for split in mixture.splits)
    assert Counter(sources.tolist()) == {0: n_a * 4, 1: n_b * 2}  # epochs still exact


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_together_yield_the_single_rank_sequences(prepared, world: int) -> None:
    mixture = Mixture.open(prepared.data)
    single = real_rows(MixtureLoader(mixture, 6))
    per_rank = [list(MixtureLoader(mixture, 2, rank=r, world_size=world)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # ranks stay in step
    assert all(b["input_ids"].shape == (2, 16) for batches in per_rank for b in batches)
    sharded = [row for batches in per_rank for row in real_rows(batches)]
    assert Counter(sharded) == Counter(single)
    assert len(single) == mixture.n_sequences


def real_rows(batches) -> list[tuple[int, ...]]:
    """Sequences of the batches, without the all-ignored padding rows."""
    return [
        tuple(r.tolist())
        for b in batches
        for r, lab in zip(b["input_ids"], b["labels"], strict=True)
        if (lab != IGNORE_INDEX).any()
    ]


def DATA(config) -> str:
    return config.data.data_dir


def _take(loader: MixtureLoader, n: int) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        out.append(batch["input_ids"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_resume_continues_with_the_next_sequence(prepared, k: int) -> None:
    mixture = Mixture.open(prepared.data)
    never_stopped = [b["input_ids"] for b in MixtureLoader(mixture, 4)]
    first = MixtureLoader(mixture, 4)
    head = _take(first, k)
    state = first.state_dict()
    resumed = MixtureLoader(Mixture.open(prepared.data), 4)
    resumed.load_state_dict(state)
    tail = [b["input_ids"] for b in resumed]
    assert len(head) + len(tail) == len(never_stopped)
    for got, want in zip(head + tail, never_stopped, strict=True):
        assert torch.equal(got, want)


def test_resume_at_another_data_parallel_degree(prepared) -> None:
    mixture = Mixture.open(prepared.data)
    everything = Counter(
        tuple(r.tolist()) for b in MixtureLoader(mixture, 4) for r in b["input_ids"]
    )
    ranks = [MixtureLoader(mixture, 2, rank=r, world_size=2) for r in range(2)]
    seen = Counter()
    for loader in ranks:
        for batch in _take(loader, 3):
            seen.update(tuple(r.tolist()) for r in batch)
    resumed = MixtureLoader(mixture, 4)  # one rank now
    resumed.load_state_dict(ranks[0].state_dict())
    seen.update(tuple(r.tolist()) for b in resumed for r in b["input_ids"])
    assert seen == everything


def test_state_from_another_mixture_is_refused(prepared, corpus: Path) -> None:
    loader = MixtureLoader(Mixture.open(prepared.data), 4)
    other = make_config(corpus, "--data.sources.0.epochs", "5")
    with pytest.raises(UserError, match="data loader state comes from a different mixture"):
        MixtureLoader(Mixture.open(other.data), 4).load_state_dict(loader.state_dict())


def test_same_seed_same_order_other_seed_other_order(prepared, corpus: Path) -> None:
    a = Mixture.open(prepared.data).plan.doc_index
    b = Mixture.open(prepared.data).plan.doc_index
    other = make_config(corpus, "--data.seed", "99", "--data.data_dir", str(corpus / "seed99"))
    prepare(other, log=lambda m: None)
    c = Mixture.open(other.data).plan.doc_index
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(UserError, match="was prepared with other settings"):
        Mixture.open(make_config(corpus, "--data.seed", "99").data)


def test_validation_split_is_each_held_out_document_once(prepared) -> None:
    train = Mixture.open(prepared.data)
    train_docs = set(stream_documents(train, list(MixtureLoader(train, 8)), DATA(prepared)))
    for source in ("a", "b"):
        val = Mixture.open(prepared.data, split="val", source=source)
        docs = stream_documents(val, list(MixtureLoader(val, 8)), DATA(prepared))
        held = val.splits[0].documents
        assert held >= 1 and len(docs) == held and len(set(docs)) == held
        assert not set(docs) & train_docs


def test_sequences_pack_labels_and_document_positions(prepared) -> None:
    mixture = Mixture.open(prepared.data)
    for g in (0, 1, mixture.n_sequences - 1):
        seq = mixture.sequence(g)
        nxt = mixture.sequence(g + 1) if g + 1 < mixture.n_sequences else None
        if nxt is not None:  # labels are the inputs shifted by one, across the window edge
            assert seq["labels"][-1] == nxt["input_ids"][0]
        assert np.array_equal(
            seq["labels"][:-1][seq["labels"][:-1] != IGNORE_INDEX],
            seq["input_ids"][1:][seq["labels"][:-1] != IGNORE_INDEX],
        )
        starts = np.flatnonzero(seq["positions"] == 0)
        ends = np.flatnonzero(seq["input_ids"] == mixture.eos_id)
        assert set(starts[starts > 0]) <= set(ends + 1)  # a document starts after an end-of-text
        assert seq["positions"].max() < 16  # positions restart at the window, never beyond it
        assert np.all(np.diff(seq["document_ids"]) >= 0)
    last = mixture.sequence(mixture.n_sequences - 1)
    assert (last["labels"] == IGNORE_INDEX).sum() == 16 * mixture.n_sequences - (
        mixture.plan.length - 1
    )
    batch = next(iter(MixtureLoader(mixture, 2, document_mask=True)))
    assert set(batch) == {"input_ids", "labels", "padding", "positions", "document_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["padding"].dtype == torch.bool


@pytest.mark.parametrize("packing", ["stream", "documents"])
def test_padding_marks_the_tokens_that_only_fill_a_row(corpus: Path, packing: str) -> None:
    """The inputs after a row's last real token (each labelled ignored and end-of-text), and
    the whole of a padding row at the stream's end; nothing else."""
    config = make_config(corpus, "--data.packing", packing, "--data.document_mask", "true")
    prepare(config, log=lambda m: None)
    mixture = Mixture.open(config.data)
    padded = 0
    for g in range(mixture.n_sequences):
        seq = mixture.sequence(g)
        pad = seq["padding"]
        real = int((~pad).sum())
        assert not pad[:real].any() and pad[real:].all()  # one run, at the end
        assert (seq["input_ids"][pad] == mixture.eos_id).all()
        assert (seq["labels"][pad] == IGNORE_INDEX).all() and real >= 1
        if real < 16:  # a padded row's last real token predicts nothing
            assert seq["labels"][real - 1] == IGNORE_INDEX
        padded += pad.sum()
    if packing == "stream":  # only the last window can be short: all but its last input
        assert padded == max(16 * mixture.n_sequences - (mixture.plan.length - 1) - 1, 0)
    else:
        assert padded > 0  # not vacuous: rows of whole documents seldom fill up
    rows = mixture.n_sequences + 1  # one padding row evens out the last batch
    batches = list(MixtureLoader(mixture, rows, document_mask=True))
    assert batches[-1]["padding"][-1].all()


@pytest.mark.parametrize("span", [8, 12])
def test_long_document_share_counts_sequences_with_a_long_run(prepared, span: int) -> None:
    """Against the sequences themselves: a sequence counts when one document id covers more
    than ``span`` of its (unpadded) tokens."""
    mixture = Mixture.open(prepared.data)
    longest = []
    for g in range(mixture.n_sequences):
        seq = mixture.sequence(g)
        ids = seq["document_ids"][seq["labels"] != IGNORE_INDEX]
        longest.append(max(Counter(ids.tolist()).values(), default=0))
    want = sum(n > span for n in longest) / mixture.n_sequences
    assert 0 < want < 1  # the spans chosen tell sequences apart
    assert mixture.long_document_share(span) == pytest.approx(want)


def test_long_documents_are_repeated_in_each_epoch_of_their_source(prepared) -> None:
    """Documents longer than long_doc_tokens appear long_doc_repeat times per epoch, the rest
    once; the planned tokens follow, and more sequences hold a long run."""
    plain = Mixture.open(prepared.data)
    threshold = int(np.median(np.concatenate([s.doc_lengths for s in plain.splits])))
    data = dataclasses.replace(prepared.data, long_doc_tokens=threshold, long_doc_repeat=3)
    mixture = Mixture.open(data)
    docs = Counter(
        zip(mixture.plan.doc_source.tolist(), mixture.plan.doc_index.tolist(), strict=True)
    )
    for s, (split, source) in enumerate(zip(mixture.splits, data.sources, strict=True)):
        for d in range(split.documents):
            copies = 3 if split.doc_lengths[d] > threshold else 1
            assert docs[(s, d)] == source.epochs * copies
    assert sum(mixture.planned_tokens()) == mixture.plan.length
    assert mixture.planned_tokens() != plain.planned_tokens()
    assert mixture.fingerprint != plain.fingerprint  # a resume can't mix the two streams

    # More of the stream is long documents. (The share of sequences holding a long run is
    # not monotone in this: each stream is shuffled afresh; test_long_document_share checks
    # that measure against the sequences themselves.)
    def long_fraction(m: Mixture) -> float:
        sizes = np.diff(np.append(m.plan.doc_start, m.plan.length))
        return float(sizes[sizes > threshold + 1].sum() / m.plan.length)

    assert long_fraction(mixture) > long_fraction(plain)
    held_out = Mixture.open(data, split="val", source=data.sources[0].name)
    assert (
        held_out.plan.length == Mixture.open(prepared.data, "val", data.sources[0].name).plan.length
    )


def test_long_doc_settings_are_validated() -> None:
    from moegpt.config import DataConfig

    with pytest.raises(UserError, match="data.long_doc_repeat"):
        DataConfig(long_doc_repeat=0).validate()
    with pytest.raises(UserError, match="data.long_doc_tokens"):
        DataConfig(long_doc_tokens=-1).validate()


def test_episodes_are_packed_whole_and_a_too_long_one_as_its_documents() -> None:
    def packed(sizes: list[int], opens: list[int] | None) -> list[list[int]]:
        where = None if opens is None else np.array(opens, bool)
        result = pack_documents(np.array(sizes), 10, skip_long=False, opens=where)
        return [result.documents_of(g).tolist() for g in range(result.n_sequences)]

    # episodes [0] [1, 2] [3]: the second would not fit after the first, so it starts anew
    assert packed([2, 5, 4, 3], [1, 1, 0, 1]) == [[0], [1, 2], [3]]
    assert packed([2, 5, 4, 3], None) == [[0, 1], [2, 3]]
    # [5, 6] is 18 tokens, more than a sequence: its documents go one by one
    sizes, opens = [3, 3, 3, 4, 2, 9, 9, 1], [1, 0, 0, 1, 0, 1, 0, 1]
    assert packed(sizes, opens) == [[0, 1, 2], [3, 4], [5], [6, 7]]
    result = pack_documents(np.array(sizes), 10, skip_long=False, opens=np.array(opens, bool))
    assert result.opens.tolist() == [1, 0, 0, 1, 0, 1, 1, 1]
