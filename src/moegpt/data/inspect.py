"""`moegpt data inspect`: what the prepared mixture holds and what a run will see of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from moegpt.config import Config
from moegpt.console import human
from moegpt.data.mixture import Mixture
from moegpt.data.shards import read_manifest
from moegpt.data.tokenizer import load_tokenizer
from moegpt.plan.schedule import build_schedule


def inspect_data(config: Config, samples: int = 2, sample_chars: int = 300) -> dict[str, Any]:
    """Per-source documents and tokens, planned shares, run coverage and decoded samples."""
    data_dir = Path(config.data.data_dir)
    manifest = read_manifest(data_dir)
    mixture = Mixture.open(config.data)  # checks every training file's size and sha256
    for source in config.data.sources:  # and every held-out file's
        Mixture.open(config.data, split="val", source=source.name)
    planned = mixture.planned_tokens()
    total_planned = sum(planned) or 1
    rows = []
    for source, split, tokens in zip(mixture.sources, mixture.splits, planned, strict=True):
        entry = manifest["sources"][source.name]
        rows.append(
            {
                "source": source.name,
                "kind": source.kind,
                "path": source.path,
                "bytes": entry["bytes"],
                "train_documents": split.documents,
                "train_tokens": split.tokens,
                "val_documents": entry["splits"]["val"]["documents"],
                "val_tokens": entry["splits"]["val"]["tokens"],
                "epochs": source.epochs,
                "weight": source.weight,
                "planned_tokens": tokens,
                "share": tokens / total_planned,
            }
        )
    run_sequences = build_schedule(config.train).total_sequences  # the ramp included
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["file"])
    decoded = [
        tokenizer.decode(mixture.sequence(g)["input_ids"].tolist(), skip_special_tokens=False)[
            :sample_chars
        ]
        for g in range(min(samples, mixture.n_sequences))
    ]
    return {
        "data_dir": str(data_dir),
        "verified": "size and sha256 of every training and validation file",
        "tokenizer": manifest["tokenizer"],
        "seq_len": mixture.seq_len,
        "sources": rows,
        "planned_tokens": sum(planned),
        "stream_tokens": mixture.plan.length,
        "sequences": mixture.n_sequences,
        "run": {
            "steps": config.train.steps,
            "sequences": run_sequences,
            "tokens": run_sequences * mixture.seq_len,
            "mixture_fraction": run_sequences / max(mixture.n_sequences, 1),
        },
        "samples": decoded,
        "long_documents": _long_documents(config, mixture),
        "whole_documents": _whole_documents(config, mixture),
    }


def _whole_documents(config: Config, mixture: Mixture) -> dict[str, Any] | None:
    """For sequences of whole documents: how many documents are longer than a sequence,
    the share of positions that are padding (compute that trains nothing), and the documents
    an episode holds on average (1 without ``interleave``)."""
    packed = mixture.packed
    if packed is None:
        return None
    sizes = np.diff(np.append(mixture.plan.doc_start, mixture.plan.length))
    used = int(np.minimum(sizes[packed.order], mixture.seq_len).sum())
    positions = max(packed.n_sequences * mixture.seq_len, 1)
    episodes = int(packed.opens[packed.order].sum())
    return {
        "over_seq_len": packed.over_length,
        "policy": config.data.long_documents,
        "padding_share": 1.0 - used / positions,
        "documents_per_episode": len(packed.order) / max(episodes, 1),
    }


def _long_documents(config: Config, mixture: Mixture) -> dict[str, Any] | None:
    """For a context extension (``model.rope_scaling.original_max_seq_len`` set): the share
    of sequences in which a document runs past the original context."""
    original = config.model.rope_scaling.original_max_seq_len
    if not original:
        return None
    return {
        "original_context": original,
        "share": mixture.long_document_share(original),
        "long_doc_tokens": config.data.long_doc_tokens,
        "long_doc_repeat": config.data.long_doc_repeat,
    }


def inspect_table(report: dict[str, Any]) -> Table:
    table = Table(
        title=f"{report['data_dir']}: {human(report['planned_tokens'])} planned training tokens "
        f"in {report['sequences']:,} sequences of {report['seq_len']}",
        title_justify="left",
        show_edge=False,
    )
    for column in (
        "source",
        "kind",
        "docs train/val",
        "tokens train/val",
        "epochs",
        "planned",
        "share",
    ):
        table.add_column(column, justify="left" if column in ("source", "kind") else "right")
    for r in report["sources"]:
        table.add_row(
            r["source"],
            r["kind"],
            f"{r['train_documents']:,}/{r['val_documents']:,}",
            f"{human(r['train_tokens'])}/{human(r['val_tokens'])}",
            str(r["epochs"]),
            human(r["planned_tokens"]),
            f"{r['share']:.1%}",
        )
    return table
