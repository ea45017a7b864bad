"""Chat sources: JSONL conversations rendered with the model's template, trained only on the
assistant's turns, packed whole with the document mask; packing changes nothing."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from moegpt.chat import ChatTemplate
from moegpt.config import ConfigError, load_config
from moegpt.data.mixture import IGNORE_INDEX, Mixture, MixtureLoader
from moegpt.data.prepare import prepare
from moegpt.data.tokenizer import load_tokenizer
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.train.trainer import lm_loss_sum
from tests.conftest import small_config
from tests.data.conftest import document


def conversation(i: int) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": document("q", i)}]
    turns.append({"role": "assistant", "content": document("answer", i * 3)})
    if i % 3 == 0:  # some with a system turn and a second exchange
        turns = [{"role": "system", "content": "Be brief."}, *turns]
        turns += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    return turns


def write_chat(root: Path, n: int = 30, extra: str = "") -> Path:
    path = root / "chat.jsonl"
    lines = [json.dumps({"messages": conversation(i)}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def chat_config(root: Path, *overrides: str, val_fraction: float = 0.1):
    recipe = root / "chat.toml"
    recipe.write_text(
        "[model]\nvocab_size = 320\nmax_seq_len = 256\n"
        f'[data]\nseq_len = 128\ndata_dir = "{root / "prepared"}"\nworkers = 1\n'
        'packing = "documents"\ndocument_mask = true\n'
        f'[[data.sources]]\nname = "chat"\nkind = "chat"\npath = "{root / "chat.jsonl"}"\n'
        f"val_fraction = {val_fraction}\n"
    )
    return load_config(recipe, list(overrides))


@pytest.fixture
def chat(tmp_path: Path):
    write_chat(tmp_path)
    config = chat_config(tmp_path)
    prepare(config, log=lambda m: None)
    return config


def template_of(config) -> ChatTemplate:
    data_dir = Path(config.data.data_dir)
    template = ChatTemplate.from_folder(data_dir, load_tokenizer(data_dir / "tokenizer.json"))
    assert template is not None
    return template


def test_labels_are_exactly_each_conversations_assistant_turns(chat) -> None:
    """Every sequence is whole conversations; a position is labelled exactly where the
    template's rendering marks the next token as the assistant's."""
    mixture = Mixture.open(chat.data)
    template = template_of(chat)
    expected = {}
    for i in range(30):
        encoded = template.encode_with_labels(conversation(i))
        expected[tuple(encoded.ids)] = encoded.labels
    seen = 0
    for g in range(mixture.n_sequences):
        seq = mixture.sequence(g)
        for doc in set(seq["document_ids"].tolist()):
            at = seq["document_ids"] == doc
            ids, labels = seq["input_ids"][at], seq["labels"][at]
            if (labels == IGNORE_INDEX).all() and ids[0] == mixture.eos_id:
                continue  # padding
            ids = ids[:-1]  # its end-of-text
            trained = expected[tuple(ids.tolist())]
            assert seq["positions"][at].tolist() == list(range(len(ids) + 1))
            want = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], trained[1:], strict=True)]
            assert labels.tolist() == [*want, IGNORE_INDEX, IGNORE_INDEX]
            seen += 1
    assert seen == mixture.splits[0].documents * chat.data.sources[0].epochs


def test_packed_and_unpacked_conversations_give_equal_losses_and_gradients(chat) -> None:
    """A packed sequence (document mask, positions restarting) against each of its
    conversations run alone."""
    mixture = Mixture.open(dataclasses.replace(chat.data, seq_len=256))
    batch = next(  # a sequence packing several conversations (and padding)
        b
        for b in MixtureLoader(mixture, 1, document_mask=True)
        if len(set(b["document_ids"][0].tolist())) > 2
    )
    torch.manual_seed(0)
    model = Transformer(small_config(vocab_size=320, max_seq_len=256))

    def loss_and_grads(ids, labels, **kw):
        model.zero_grad()
        loss = lm_loss_sum(model(ids, **kw).logits, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed, packed_grads = loss_and_grads(
        batch["input_ids"],
        batch["labels"],
        positions=batch["positions"],
        document_ids=batch["document_ids"],
    )
    alone, alone_grads = torch.zeros(()), None
    for doc in set(batch["document_ids"][0].tolist()):
        at = batch["document_ids"][0] == doc
        loss, grads = loss_and_grads(batch["input_ids"][:, at], batch["labels"][:, at])
        alone = alone + loss
        if alone_grads is not None:
            grads = [a + b for a, b in zip(alone_grads, grads, strict=True)]
        alone_grads = grads
    assert packed > 0 and packed == pytest.approx(float(alone), rel=1e-5)
    for a, b in zip(packed_grads, alone_grads, strict=True):
        # fp32 sums in another order (packed matmuls against per-conversation ones, the CPU's
        # threads): elementwise 1e-6 failed about one run in ten on single elements whose
        # terms cancel, so the bound is on each tensor's relative error.
        assert (a - b).norm() <= 1e-5 * b.norm(), float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("policy", "left_out"), [("truncate", 0), ("skip", 1)])
def test_a_conversation_longer_than_a_sequence(tmp_path: Path, policy: str, left_out: int) -> None:
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    write_chat(tmp_path, extra=json.dumps({"messages": long}) + "\n")
    config = chat_config(tmp_path, "--data.long_documents", policy, val_fraction=0.0)
    prepare(config, log=lambda m: None)
    mixture = Mixture.open(config.data)
    assert mixture.packed is not None and mixture.packed.over_length == 1
    assert len(mixture.packed.order) == mixture.splits[0].documents - left_out
    lengths = {len(mixture.sequence(g)["input_ids"]) for g in range(mixture.n_sequences)}
    assert lengths == {128}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, r"chat.jsonl:31: messages\[0\].role"),
        ({"messages": [{"role": "user"}]}, r"chat.jsonl:31: messages\[0\].content: must be a str"),
        ({"messages": [{"role": "user", "content": 1}]}, r"chat.jsonl:31: messages\[0\].content"),
        ({"text": "hello"}, r"chat.jsonl:31: messages: expected a non-empty list"),
    ],
)
def test_a_bad_line_names_its_file_and_line(tmp_path: Path, line: dict, message: str) -> None:
    write_chat(tmp_path, extra=json.dumps(line) + "\n")
    with pytest.raises(UserError, match=message):
        prepare(chat_config(tmp_path), log=lambda m: None)
    assert not (tmp_path / "prepared" / "manifest.json").exists()  # nothing half-written


def test_chat_sources_need_whole_documents_and_masks(tmp_path: Path) -> None:
    write_chat(tmp_path)
    with pytest.raises(ConfigError, match="^data.packing: chat sources train on whole"):
        chat_config(tmp_path, "--data.packing", "stream")
    with pytest.raises(ConfigError, match="^data.document_mask: packed conversations"):
        chat_config(tmp_path, "--data.document_mask", "false")


def test_inspect_counts_conversations_longer_than_a_sequence(tmp_path: Path, capsys) -> None:
    from moegpt.cli import main

    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    write_chat(tmp_path, extra=json.dumps({"messages": long}) + "\n")
    chat_config(tmp_path, val_fraction=0.0)
    recipe = str(tmp_path / "chat.toml")
    assert main(["prepare", "--config", recipe]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", "--config", recipe, "--data.long_documents", "skip"]) == 0
    out = capsys.readouterr().out
    assert "1 longer than a sequence (128 tokens), left out (data.long_documents)" in out


def test_a_conversation_with_nothing_to_train_on_is_named_by_its_line(tmp_path: Path) -> None:
    lonely = json.dumps({"messages": [{"role": "user", "content": "Anyone there?"}]})
    path = write_chat(tmp_path, n=30, extra=lonely + "\n")
    with pytest.raises(UserError, match=rf"^{path}:31: chat_template: renders no assistant"):
        prepare(chat_config(tmp_path, val_fraction=0.0), log=lambda m: None)


def test_built_in_corpora_are_read_as_what_they_hold(tmp_path: Path) -> None:
    """Conversations are kind = "chat" and nothing else is: a mismatch would crash on JSON
    or train on raw JSON."""
    write_chat(tmp_path)
    said = 'data.sources[0].kind: "chat" reads conversations, and stdlib:text holds none'
    with pytest.raises(ConfigError, match="^" + re.escape(said)):
        chat_config(tmp_path, "--data.sources.0.path=stdlib:text")
    said = 'data.sources[0].kind: stdlib:instruct holds conversations: use kind = "chat"'
    with pytest.raises(ConfigError, match="^" + re.escape(said)):
        load_config(None, ["--data.sources.0.path=stdlib:instruct"])  # kind "code"
