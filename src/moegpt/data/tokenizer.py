"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), trained on a recipe or loaded.

Byte-level pre-tokenization over the 256-byte alphabet with no normalizer makes encoding
lossless for any string; special tokens are reserved for the stages that need them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moegpt.errors import UserError

END_OF_TEXT = "<|endoftext|>"
IMAGE = "<|image|>"  # where an image stands in the text (vision)
# Reserved now so every later stage (chat fine-tuning, vision) keeps the same ids.
SPECIAL_TOKENS = (END_OF_TEXT, "<|pad|>", "<|im_start|>", "<|im_end|>", IMAGE)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` ids (specials first) trained on ``texts``."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise UserError(
            f"model.vocab_size: {vocab_size} is below the byte alphabet + specials ({minimum})"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own exception types for bad files
        raise UserError(f"{path}: not a tokenizer.json ({e})") from None
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise UserError(f"{path}: has no {END_OF_TEXT} token to separate documents")
    return tokenizer


def tokenizer_hash(path: str | Path) -> str:
    """Identity of a tokenizer file: shards record it and refuse another tokenizer's."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of raw documents: special-token strings inside a document stay plain text,
    so a document quoting <|endoftext|> cannot forge a document boundary."""
    tokenizer.encode_special_tokens = True
    try:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = False
