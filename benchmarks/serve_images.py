"""Serving throughput of a vision model with one image per request, against the same requests
as text alone: the engine in-process (no HTTP), `--requests` prompts of `--prompt-len` random
tokens, `--output-len` greedy tokens each, all queued at once and batched continuously. Each
side gets a warm-up run, then the median of `--repeats` runs; the image side also reports what
encoding the images cost (the encoder and resampler, and every block's keys and values, once
per request).

    python benchmarks/serve_images.py --model runs/tiny-vision/export --out benchmarks/results
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from verbs import device_tag, save

from moegpt.config import ServeConfig
from moegpt.serve.engine import Engine
from moegpt.serve.media import VisualCache
from moegpt.serve.sequence import SamplingParams


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run(engine: Engine, prompts: list[list[int]], images: list[torch.Tensor], n: int) -> dict:
    """One run of every request to its end."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    sync(engine)
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, images=[images[i]] if images else None)
    tokens = 0
    while engine.has_work():
        tokens += sum(len(o.token_ids) for o in engine.step())
    sync(engine)
    seconds = time.perf_counter() - started
    return {"tokens_per_second": tokens / seconds, "seconds": seconds}


def encode_ms(engine: Engine, images: list[torch.Tensor]) -> float:
    """Median time to encode one request's image into its cache (after one warm-up)."""
    assert engine.vision is not None
    times = []
    for image in [images[0], *images]:
        sync(engine)
        started = time.perf_counter()
        VisualCache.encode(engine.vision, image[None], [0])
        sync(engine)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3


def median_run(
    engine: Engine, prompts: list[list[int]], images: list[torch.Tensor], n: int, repeats: int
) -> dict:
    run(engine, prompts, images, n)  # warm-up on the same shapes
    runs = [run(engine, prompts, images, n) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported vision model folder")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    config = ServeConfig(max_batch_size=args.requests, max_images=1, calibrate=False)
    engine = Engine.from_folder(args.model, config)
    vision = engine.vision
    if vision is None:
        raise SystemExit(f"{args.model}: a text model; this measures a vision model")
    generator = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    marker = vision.image_token_id
    texts = [
        [
            t if t != marker else t + 1
            for t in torch.randint(5, vocab, (args.prompt_len,), generator=generator).tolist()
        ]
        for _ in range(args.requests)
    ]
    size = vision.config.image_size
    images = [
        torch.randint(0, 256, (size, size), dtype=torch.uint8, generator=generator)
        for _ in range(args.requests)
    ]
    with_images = [[marker, *t] for t in texts]
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name()
        if engine.device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "repeats": args.repeats,
        "statistic": "median after one warm-up run",
        "engine": engine.describe(),
        "text": median_run(engine, texts, [], args.output_len, args.repeats),
        "one_image": median_run(engine, with_images, images, args.output_len, args.repeats),
        "encode_ms_per_image": encode_ms(engine, images),
    }
    ratio = result["one_image"]["tokens_per_second"] / result["text"]["tokens_per_second"]
    result["image_over_text"] = ratio
    lines = [
        f"{args.model} on {result['device']}: {args.requests} requests at once, prompts of "
        f"{args.prompt_len} tokens (+1 <|image|>), {args.output_len} tokens out; median of "
        f"{args.repeats} after a warm-up",
        f"engine: {result['engine']}",
        f"text only     {result['text']['tokens_per_second']:>10,.1f} tokens/s",
        f"one image     {result['one_image']['tokens_per_second']:>10,.1f} tokens/s "
        f"({ratio:.2f}x); encoding one request's image: {result['encode_ms_per_image']:.2f} ms",
    ]
    tag = f"{Path(args.model).parent.name or Path(args.model).name}-{device_tag()}"
    save(args.out, f"serve_images-{tag}", result, "\n".join(lines))


if __name__ == "__main__":
    main()
