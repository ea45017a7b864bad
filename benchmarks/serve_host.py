"""The serving engine's host time per sequence per decode step, with the device taken out.

At hundreds of concurrent requests a decode step on a GPU is bound by the host: planning the
step, packing its inputs, reading its tokens back and taking them in, in Python, once per
sequence. (On H200s small-moe's decode step at 256 sequences took 3.9 to 8.0 ms on
different machines while the GPU's share stayed put: `serve_vs_hf-small-moe-h200*.txt`.)
This measures that host work on any machine: an engine at ``--batch`` running decodes, its
model forward replaced by a stand-in that returns zero logits at once, timed by phase:

- schedule: ``Scheduler.schedule`` (the step's plan);
- pack: the runner's packed model input (``ModelRunner._model_input``);
- graph inputs: filling the decode graph's input buffers (``ModelForward._replay``: slot
  mapping, padded block tables, one copy), as on a GPU; the replay itself is stood in for;
- launch, rest: the rest of launching (the draw's set-up and its copy to the host; on a
  CPU also the greedy argmax itself);
- collect: reading the drawn tokens back into the runner;
- update: ``Scheduler.update`` (appending, stops, the per-sequence outputs);
- account: the engine's statistics.

Each figure is from the fastest of ``--repeats`` runs of ``--steps`` steps (its phases add
up to its total), in microseconds per sequence per step. A GPU step's host time at that
batch is about batch x the total.

    python benchmarks/serve_host.py                       # tiny, 256 sequences, on CPU
    python benchmarks/serve_host.py --batch 64 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from moegpt.config import ServeConfig, load_config
from moegpt.model import Transformer
from moegpt.serve.engine import Engine
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.output import OutputProcessor
from moegpt.serve.paged import PagedKVCache
from moegpt.serve.runner import ModelForward
from moegpt.serve.sequence import SamplingParams

PHASES = (
    "schedule",
    "pack",
    "graph inputs",
    "launch, rest",
    "collect",
    "update",
    "account",
    "total",
)


def _timed(owner: object, name: str, spent: Counter, phase: str) -> None:
    """Wrap ``owner.name`` so that its calls add their seconds to ``spent[phase]``."""
    inner: Callable = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - start

    setattr(owner, name, timed)


def host_engine(config_path: str, batch: int, prompt_len: int) -> tuple[Engine, Counter]:
    """An engine on CPU, overlapped as on a GPU, whose steps go through decode graphs (as
    on a GPU) whose replay is stood in for: zero logits at once. Prompt steps run no model
    either. Returned with ``batch`` requests through their prompts, and the per-phase
    seconds it will add up."""
    config = load_config(config_path)
    torch.manual_seed(0)
    model = Transformer(config.model).eval()
    vocab = config.model.vocab_size
    blocks = batch * -(-config.model.max_seq_len // 16)  # every sequence at its longest
    serve = ServeConfig(
        max_batch_size=batch, num_kv_blocks=blocks, overlap="on", decode_attention="padded"
    )
    engine = Engine(model, config=serve)
    dtype = next(model.parameters()).dtype
    cache = PagedKVCache(
        config.model, blocks, serve.block_size, dtype, engine.device, spare_block=True
    )
    graphs = DecodeGraphs(model, cache, batch, config.model.max_seq_len)
    graphs._logits.zero_()
    graphs._forward = lambda inputs: None  # the replay: its logits stay zero
    forward = ModelForward(model, cache, engine.device, batch_invariant=False, graphs=graphs)

    def stand_in(inp, patch=None, media=None) -> torch.Tensor:
        if forward._uniform(inp):
            return forward(inp, patch)
        forward.tables.apply(inp.tables)  # a prompt step's tables, as its forward would
        return torch.zeros(len(inp.logits_rows), vocab)

    engine.runner.forward = stand_in
    spent: Counter = Counter()
    _timed(engine.scheduler, "schedule", spent, "schedule")
    _timed(engine.scheduler, "update", spent, "update")
    _timed(engine.runner, "_model_input", spent, "pack")
    _timed(forward, "_replay", spent, "graph inputs")
    _timed(engine.runner, "launch", spent, "launch")
    _timed(engine.runner, "collect", spent, "collect")
    _timed(engine, "_account", spent, "account")
    prompts = torch.randint(vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=1_000_000, temperature=0, ignore_eos=True)
    for prompt in prompts.tolist():
        engine.add_request(prompt, params)
    while engine.scheduler.waiting or any(s.prefilling for s in engine.scheduler.running):
        engine.step()
    return engine, spent


def measure(engine: Engine, spent: Counter, steps: int, repeats: int) -> dict[str, float]:
    """The phases of the fastest of ``repeats`` runs of ``steps`` decode steps, in us a
    sequence a step (the steps' outputs are turned into text, as ``generate`` does)."""
    batch = len(engine.scheduler.running)
    processors = {
        s.request_id: OutputProcessor(engine.tokenizer, ()) for s in engine.scheduler.running
    }
    best = dict.fromkeys(PHASES, float("inf"))
    for _ in range(repeats):
        spent.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.text_step(processors)
        spent["total"] = time.perf_counter() - start
        spent["launch, rest"] = spent["launch"] - spent["pack"] - spent["graph inputs"]
        assert len(engine.scheduler.running) == batch, "a sequence ended mid-run"
        if spent["total"] / steps / batch * 1e6 < best["total"]:
            best = {phase: spent[phase] / steps / batch * 1e6 for phase in PHASES}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.toml", help="the model's shapes")
    parser.add_argument("--batch", type=int, default=256, help="sequences decoding at once")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="decode steps a run")
    parser.add_argument("--repeats", type=int, default=7, help="runs; the fastest is reported")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if min(args.batch, args.prompt_len, args.steps, args.repeats) < 1:
        parser.error("--batch, --prompt-len, --steps and --repeats must be at least 1")
    context = load_config(args.config).model.max_seq_len
    if args.prompt_len + args.steps * args.repeats + 4 > context:
        parser.error(
            f"--prompt-len + --steps x --repeats: {args.prompt_len} + {args.steps} x "
            f"{args.repeats} tokens would run past {args.config}'s {context}-token context"
        )
    engine, spent = host_engine(args.config, args.batch, args.prompt_len)
    engine.text_step({})  # the first overlapped step: nothing taken in yet
    best = measure(engine, spent, args.steps, args.repeats)
    result = {
        "config": args.config,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "statistic": "min",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "us_per_sequence_step": best,
        "ms_per_step": best["total"] * args.batch / 1e3,
    }
    lines = [
        f"serving host time, {args.batch} sequences decoding ({args.config}, forward stood in "
        f"for; fastest of {args.repeats} runs of {args.steps} steps), us a sequence a step:",
        *(f"  {phase:<13} {best[phase]:6.2f}" for phase in PHASES),
        f"  = {result['ms_per_step']:.2f} ms of host time a step",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_host-{Path(args.config).stem}-{args.batch}-cpu"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.txt").write_text(text + "\n")
    print(f"wrote {out / stem}.json and .txt")


if __name__ == "__main__":
    main()
