"""Sampling text from a model with a KV cache: the small loop the quick start and tests use
(the serving engine is the batched, paged version)."""

from __future__ import annotations

import torch

from moegpt.errors import UserError
from moegpt.memory import gib, kv_budget_bytes
from moegpt.model import KVCache, Transformer
from moegpt.serve.sequence import GREEDY_BELOW


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Token ids continuing ``prompt`` (greedy when temperature is 0)."""
    weight = model.tok_embeddings.weight
    device = weight.device
    length = min(len(prompt) + max_new_tokens, model.config.max_seq_len)
    # The cache is sized by the request and capped by memory, never by max_seq_len alone.
    token_bytes = model.config.kv_cache_bytes_per_token(weight.element_size())
    budget, source = kv_budget_bytes(device)
    if len(prompt) >= budget // token_bytes:
        raise UserError(
            f"prompt: {len(prompt)} tokens of KV cache exceed the budget ({gib(budget)}: {source})"
        )
    length = min(length, budget // token_bytes)
    cache = KVCache.for_model(model, batch_size=1, max_len=length)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], device=device)
    out: list[int] = []
    while cache.seq_len + tokens.shape[1] <= length and len(out) < max_new_tokens:
        logits = model(tokens, cache=cache).logits[0, -1].float()
        if temperature < GREEDY_BELOW:
            next_id = int(logits.argmax())
        else:
            values, indices = logits.topk(min(top_k, logits.numel()))
            probs = torch.softmax(values / temperature, dim=-1)
            next_id = int(indices[torch.multinomial(probs, 1, generator=generator)])
        if next_id == stop_id:
            break
        out.append(next_id)
        tokens = torch.tensor([[next_id]], device=device)
    return out
