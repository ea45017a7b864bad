"""The `moegpt` command line: one verb per stage of a model's life."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import signal
import statistics
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moegpt import __version__
from moegpt.config import Config, ServeConfig, load_config, to_toml
from moegpt.console import stderr, stdout
from moegpt.errors import TrainingStopped, UserError

if TYPE_CHECKING:
    import torch

    from moegpt.serve.engine import Engine
    from moegpt.serve.sequence import SamplingParams

OVERRIDES_HELP = (
    "Any config field can be overridden after the options in dotted form, e.g. "
    "--model.n_layers 4 --train.lr 3e-4 (see `moegpt config show` for every field)."
)
SERVE_OVERRIDES_HELP = (
    "Any [serve] field without a flag of its own can be set after the options in dotted form, "
    "e.g. --serve.block_size 32 --serve.max_tokens_per_step 4096 (see `moegpt config show` "
    "for every field)."
)


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="TOML",
        help="recipe file (e.g. configs/tiny.toml); default: the built-in defaults",
    )


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_model_summary(args: argparse.Namespace) -> None:
    from moegpt.summary import summarize, summary_lines, summary_table

    config = _load(args)
    summary = summarize(config.model, config.vision)
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
        return
    stdout.print(summary_table(summary))
    for line in summary_lines(summary):
        stdout.print(line, highlight=False, soft_wrap=True)


def cmd_config_show(args: argparse.Namespace) -> None:
    print(to_toml(_load(args), with_help=not args.bare))


def cmd_convert(args: argparse.Namespace) -> None:
    from moegpt.convert import convert

    dst = convert(args.src, args.dst, to=args.to, overwrite=args.force)
    stderr.print(f"wrote {dst}", highlight=False)


def cmd_upcycle(args: argparse.Namespace) -> None:
    from moegpt.upcycle import upcycle

    with stderr.status(f"upcycling {args.src} to {args.experts} experts, top-{args.top_k}"):
        dst = upcycle(
            args.src, args.dst, args.experts, args.top_k, args.noise, args.seed, args.force
        )
    stderr.print(f"wrote {dst}", highlight=False)


def cmd_plan(args: argparse.Namespace) -> None:
    from moegpt.plan.plan import PlanOptions, build_plan
    from moegpt.plan.render import plan_tables, schedule_table, seed_tables, vision_table
    from moegpt.plan.seeds import seed_comparison

    config = _load(args)
    fields = {f.name for f in dataclasses.fields(PlanOptions)}
    opts = PlanOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    plan = build_plan(config, opts)
    if args.against_seeds:
        plan["seed_comparison"] = seed_comparison(config)
    if args.json:
        print(json.dumps(plan, indent=2))
        return
    tables = [*plan_tables(plan), schedule_table(plan)]
    if plan["vision"] is not None:
        tables.append(vision_table(plan))
    if args.against_seeds:
        tables += seed_tables(plan["seed_comparison"])
    for table in tables:
        stdout.print(table)
        stdout.print()


def cmd_prepare(args: argparse.Namespace) -> None:
    from moegpt.data.prepare import prepare

    config = _load(args)
    manifest = prepare(config)
    tokens = sum(s["splits"]["train"]["tokens"] for s in manifest["sources"].values())
    stderr.print(
        f"{config.data.data_dir}: {len(manifest['sources'])} sources, {tokens:,} training tokens, "
        f"tokenizer of {manifest['tokenizer']['vocab_size']:,} ids",
        highlight=False,
    )


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from moegpt.data.inspect import inspect_data, inspect_table

    report = inspect_data(_load(args), samples=args.samples)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    stdout.print(inspect_table(report))
    stdout.print(f"verified: the {report['verified']}", highlight=False)
    run = report["run"]
    stdout.print(
        f"a run of {run['steps']:,} steps reads {run['sequences']:,} sequences "
        f"({run['mixture_fraction']:.1%} of the planned mixture)",
        highlight=False,
    )
    if long := report["long_documents"]:
        stdout.print(
            f"{long['share']:.1%} of sequences hold a document longer than the original "
            f"context ({long['original_context']} tokens)"
            + (
                f"; documents over {long['long_doc_tokens']:,} tokens are read "
                f"{long['long_doc_repeat']}x per epoch"
                if long["long_doc_tokens"]
                else "; data.long_doc_tokens upsamples them"
            ),
            highlight=False,
        )
    if whole := report["whole_documents"]:
        fate = "cut to it" if whole["policy"] == "truncate" else "left out"
        stdout.print(
            f"whole documents per sequence: {whole['over_seq_len']:,} longer than a sequence "
            f"({report['seq_len']} tokens), {fate} (data.long_documents); "
            f"{whole['padding_share']:.1%} of positions are padding; "
            f"{whole['documents_per_episode']:.2f} documents an episode (interleave)",
            highlight=False,
        )
    for i, sample in enumerate(report["samples"]):
        stdout.rule(f"sample {i}")
        stdout.print(sample, markup=False, highlight=False)


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    return Path("runs") / (Path(args.config).stem if args.config else "default")


def cmd_train(args: argparse.Namespace) -> int | None:
    from moegpt.parallel.mesh import launched_by_torchrun
    from moegpt.plan.schedule import batch_phases, build_schedule

    config = _load(args)
    run_dir = _run_dir(args)
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts: must be >= 0, got {args.max_restarts}")
    if args.max_restarts and args.resume == "never":
        raise UserError("--max-restarts: restarts resume from checkpoints; drop --resume never")
    if args.nproc < 0:
        raise UserError(f"--nproc: must be >= 0, got {args.nproc}")
    nproc = args.nproc or config.parallel.world_size
    if nproc != config.parallel.world_size:
        raise UserError(
            f"--nproc: {nproc} ranks, but the [parallel] layout needs "
            f"{config.parallel.world_size} (dp_replicate x dp_shard x cp x tp x pp)"
        )
    from moegpt.parallel.apply import check_supported

    check_supported(config)  # before any rank starts
    if args.memory_check:
        _check_training_memory(config, args.dry_run)
    relaunch = not args.dry_run and not launched_by_torchrun()
    if relaunch and (nproc > 1 or args.max_restarts):
        child = ["train", "--run-dir", str(run_dir), *args.overrides]
        child += ["--resume", "auto" if args.max_restarts else args.resume]
        if not args.memory_check:
            child.append("--no-memory-check")
        if args.config:
            child += ["--config", args.config]
        if nproc > 1:
            from moegpt.parallel.launch import launch

            return launch(nproc, args.max_restarts, child)
        from moegpt.train.supervisor import supervise

        return supervise(child, args.max_restarts, stderr.print)
    schedule = build_schedule(config.train)
    if args.dry_run:
        from moegpt.train.trainer import check_batches

        check_batches(schedule, config)
        seq = config.data.seq_len
        stdout.print(
            f"{schedule.steps:,} steps, {schedule.total_sequences:,} sequences, "
            f"{schedule.total_sequences * seq:,} tokens of {seq}; peak learning rate "
            f"{config.train.lr:.2e} after {config.train.warmup_steps:,} warm-up steps",
            highlight=False,
        )
        for phase in batch_phases(schedule):
            stdout.print(
                f"steps {phase.first_step}-{phase.last_step}: batch {phase.batch_size} "
                f"({phase.sequences:,} sequences), lr {schedule.lr(phase.first_step):.2e} -> "
                f"{schedule.lr(phase.last_step):.2e}",
                highlight=False,
            )
        return None
    _train(config, run_dir, resume=args.resume == "auto")
    return None


def _check_training_memory(config: Config, dry_run: bool) -> None:
    """Refuse, before any rank starts, a layout the planner says this machine's GPUs cannot
    hold (:func:`moegpt.plan.plan.training_misfit`); warn for one near the edge, and in a dry
    run. Only the launcher (or rank 0 of an outside torchrun) judges; on CPU nothing is, since
    the model shares host memory with everything else."""
    import os

    import torch

    from moegpt.plan.plan import training_misfit

    if not torch.cuda.is_available() or os.environ.get("RANK", "0") != "0":
        return
    device = torch.cuda.get_device_properties(0)
    misfit = training_misfit(config, float(device.total_memory), device.name)
    if misfit is None:
        return
    line, refuse = misfit
    if refuse and not dry_run:
        raise UserError(f"{line} (--no-memory-check skips this check)")
    stderr.print(f"moegpt: warning: {line}", highlight=False)


def _train(config: Config, run_dir: Path, resume: bool) -> None:
    """Train in this process: alone, or as one rank of a torchrun job."""
    from moegpt.parallel.mesh import (
        ParallelDims,
        init_distributed,
        launched_by_torchrun,
        local_device,
    )
    from moegpt.train.trainer import Trainer

    if not launched_by_torchrun():
        Trainer(config, run_dir).run(resume=resume)
        stderr.print(f"finished: {run_dir}", highlight=False)
        return
    import torch.distributed as dist

    device = local_device()
    init_distributed(device, config.parallel.timeout_s)
    try:
        dims = ParallelDims.build(config.parallel, device)
        Trainer(config, run_dir, device=device, dims=dims).run(resume=resume)
        dist.barrier()  # no rank tears the group down while another still finishes
        if dist.get_rank() == 0:
            stderr.print(f"finished: {run_dir}", highlight=False)
    finally:
        dist.destroy_process_group()


def _serve_config(args: argparse.Namespace) -> ServeConfig:
    serve = dataclasses.replace(
        _load(args).serve,
        **{k: v for k, v in vars(args).items() if k in SERVE_FLAGS and v is not None},
    )
    serve.validate()
    return serve


def _with_engine(
    args: argparse.Namespace, serve: ServeConfig, work: Callable[[Engine], None]
) -> int | None:
    """Run ``work`` on an engine over MODEL_DIR: in this process, or with ``serve.tp`` > 1 on
    rank 0 of a torchrun job (started here unless this already is one), whose collectives time
    out after ``parallel.timeout_s``."""
    from moegpt.parallel.mesh import launched_by_torchrun
    from moegpt.serve.engine import Engine

    if serve.tp == 1:
        with stderr.status(f"loading {args.model_dir} (and calibrating the step-time model)"):
            engine = Engine.from_folder(args.model_dir, serve)
        work(engine)
        return None
    from moegpt.serve import tp_engine

    if not launched_by_torchrun():
        return tp_engine.launch(serve.tp, args.argv)
    tp_engine.run_rank(args.model_dir, serve, _load(args).parallel.timeout_s, work)
    return None


def cmd_generate(args: argparse.Namespace) -> int | None:
    serve = _serve_config(args)
    if serve.tp > 1 and not args.prompt:
        raise UserError("--prompt: a tensor-parallel run takes its prompts as flags")
    _sampling(args)  # bad sampling flags fail before the model loads
    return _with_engine(args, serve, lambda engine: _generate(engine, args))


def _sampling(args: argparse.Namespace, stop_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """``generate``'s sampling flags as the engine's parameters; a bad value is one line
    naming its flag (``--max-tokens``, not the parameter's field)."""
    from moegpt.serve.sequence import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            n=args.n,
            stop=tuple(args.stop or ()),
            logprobs=args.logprobs,
            ignore_eos=args.ignore_eos,
            stop_token_ids=stop_token_ids,
        )
    except UserError as e:
        field, _, why = str(e).partition(": ")
        raise UserError(f"--{field.replace('_', '-')}: {why}") from None


def cmd_serve(args: argparse.Namespace) -> int | None:
    import os

    serve = _serve_config(args)
    host = args.host or serve.host
    port = args.port if args.port is not None else serve.port
    if not 0 < port < 65536:
        raise UserError(f"--port: must be in 1..65535, got {port}")
    api_key = args.api_key or os.environ.get("MOEGPT_API_KEY") or None
    name = args.served_model_name or Path(args.model_dir).resolve().name
    flags = {k: getattr(args, k) for k in ("max_body_bytes", "max_waiting")}
    serve = dataclasses.replace(serve, **{k: v for k, v in flags.items() if v is not None})
    serve.validate()
    limits = {"max_body_bytes": serve.max_body_bytes, "max_waiting": serve.max_waiting}
    # The port is taken before the model loads, so a busy one fails at once, in one line. A
    # tensor-parallel launcher only checks it: its rank 0 serves, and binds it again.
    from moegpt.parallel.mesh import launched_by_torchrun
    from moegpt.serve.server import listening_socket

    sock = None
    if serve.tp == 1 or int(os.environ.get("RANK", "0")) == 0:
        sock = listening_socket(host, port)
        if serve.tp > 1 and not launched_by_torchrun():
            sock.close()

    def run(engine: Engine) -> None:
        from moegpt.serve.async_engine import AsyncEngine
        from moegpt.serve.server import serve as serve_http

        stderr.print(
            f"serving {name} on http://{host}:{port}{', API key required' if api_key else ''}"
            f" ({engine.describe()})",
            highlight=False,
        )
        serve_http(AsyncEngine(engine), name, sock, api_key, **limits)

    return _with_engine(args, serve, run)


def _images(engine: Engine, files: list[str]) -> list[torch.Tensor]:
    """Each ``--image`` FILE decoded for the model (one line naming a file that is not)."""
    from moegpt.serve.media import decode_image

    if files and engine.vision is None:
        raise UserError("--image: this model has no vision encoder (a text model)")
    images = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--image: {path}: no such file")
        assert engine.vision is not None
        size = engine.vision.config.image_size
        images.append(decode_image(path.read_bytes(), size, f"--image {path}"))
    return images


def _generate(engine: Engine, args: argparse.Namespace) -> None:
    """Stream one prompt to the terminal, or print each prompt's samples when done."""
    from moegpt.chat import IMAGE_PLACE
    from moegpt.serve.output import OutputProcessor
    from moegpt.serve.prompts import PlainEncoder

    template = engine.chat_template
    if engine.tokenizer is None:  # the engine takes token ids; this verb takes text
        raise UserError(
            f"{args.model_dir}: no tokenizer.json, so text cannot become tokens; copy in the "
            "tokenizer.json the model was trained with (a run's data_dir holds it)"
        )
    if args.chat and template is None:
        raise UserError(f"--chat: {args.model_dir} has no chat template (tokenizer_config.json)")
    params = _sampling(args, template.end_of_turn_ids() if args.chat and template else ())
    stderr.print(f"engine: {engine.describe()}", highlight=False)
    # A piped prompt loses the one newline that ends its last line (`echo` adds it).
    prompts = args.prompt or [sys.stdin.read().removesuffix("\n").removesuffix("\r")]
    images = _images(engine, args.image or [])
    # Special-token strings in a prompt are text, as in /v1/completions and the training data.
    # The images come first in each prompt (each as an <|image|> token), then its text.
    if args.chat and template is not None:
        places = IMAGE_PLACE * len(images)
        turns = [[{"role": "user", "content": places + p}] for p in prompts]
        encoded = [template.encode(turn, True) for turn in turns]
    else:
        encoded = PlainEncoder(engine.tokenizer).encode(prompts)
        if images:
            assert engine.vision is not None
            encoded = [[engine.vision.image_token_id] * len(images) + p for p in encoded]
    ids = [engine.add_request(p, params, images=images) for p in encoded]
    processors = {i: OutputProcessor(engine.tokenizer, params.stop) for i in ids}
    streaming = len(prompts) == 1 and args.n == 1
    if streaming:
        stdout.print(prompts[0], end="", markup=False, highlight=False)
    texts: dict[tuple[str, int], str] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    with stderr.status("generating") as status:
        while engine.has_work():
            for out in engine.text_step(processors):
                key = (out.request_id, out.index)
                piece = out.text
                texts[key] = texts.get(key, "") + piece
                reasons[key] = out.finish_reason
                if streaming:
                    stdout.print(piece, end="", markup=False, highlight=False)
            used, total = engine.kv_usage()
            status.update(f"generating: {engine.stats.generated_tokens} tokens, KV {used}/{total}")
    if streaming:
        stdout.print()
    for request, prompt in zip(ids, prompts, strict=True):
        for index in range(args.n if not streaming else 0):
            stdout.rule(f"prompt {ids.index(request) + 1}, sample {index + 1}", style="dim")
            stdout.print(prompt + texts.get((request, index), ""), markup=False, highlight=False)
    stats = engine.stats
    seconds = sum(stats.step_seconds)
    # The decode rate apart from the prompt's step: a short run's total mixes the two.
    latency = ""
    if stats.ttft_seconds and stats.tpot_seconds:
        ttft, tpot = statistics.median(stats.ttft_seconds), statistics.median(stats.tpot_seconds)
        latency = f"first token {ttft * 1e3:,.1f} ms, then {tpot * 1e3:,.2f} ms a token (medians); "
    stderr.print(
        f"{stats.generated_tokens} tokens in {stats.steps} steps, "
        f"{stats.generated_tokens / seconds if seconds else 0:,.1f} tokens/s; {latency}"
        "finish reasons: " + ", ".join(sorted({str(r) for r in reasons.values()})),
        highlight=False,
    )
    spec = stats.spec
    if spec.proposed:
        stderr.print(
            f"speculation: {spec.acceptance_rate:.0%} of {spec.proposed} proposed tokens "
            f"accepted, {spec.mean_accepted:.2f} per verification, "
            f"{stats.propose_share:.0%} of step time proposing",
            highlight=False,
        )


SERVE_FLAGS = (
    "tp",
    "block_size",
    "num_kv_blocks",
    "max_model_len",
    "max_batch_size",
    "max_tokens_per_step",
    "tpot_ms",
    "ttft_ms",
    "decode_attention",
    "cuda_graphs",
    "compile",
    "overlap",
    "draft",
    "ngram",
    "speculation",
    "spec_tokens",
    "dtype",
    "verify_weights",
)


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per engine knob of [serve], documented from the config's own field help."""
    from moegpt.config import ServeConfig

    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    defaults = ServeConfig()
    for flag in SERVE_FLAGS:
        name, doc = f"--{flag.replace('_', '-')}", fields[flag].metadata["help"]
        default = getattr(defaults, flag)
        choices = typing.get_args(typing.get_type_hints(ServeConfig)[flag]) or None
        if isinstance(default, bool):  # --flag / --no-flag, unset: the config's value
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=doc)
        else:
            kind = str if choices else type(default)
            parser.add_argument(name, type=kind, choices=choices, help=doc)


def cmd_export(args: argparse.Namespace) -> None:
    from moegpt.train.export import export

    export(Path(args.run_dir), Path(args.out_dir), overwrite=args.force)


def cmd_report(args: argparse.Namespace) -> None:
    from moegpt.train.report import write_report

    for path in write_report(Path(args.run_dir)):
        stderr.print(f"wrote {path}", highlight=False)
    print((Path(args.run_dir) / "summary.txt").read_text(), end="")


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag}: expected positive integers, got {text!r}")
    return values


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task == "instruct":
        result = _instruct(args)
    elif args.task in ("transcribe", "classify"):
        result = _vision(args)
    else:
        lengths = _int_list("--lengths", args.lengths)
        result = _passkey(args, lengths) if args.task == "passkey" else _perplexity(args, lengths)
    if args.json:
        print(json.dumps(result, indent=2))


def _instruct(args: argparse.Namespace) -> dict:
    from moegpt.data.instruct import KINDS
    from moegpt.data.sources import stdlib_instructions
    from moegpt.evals.instruct import held_out, run_instruct

    if args.limit <= 0:
        raise UserError(f"--limit: must be positive, got {args.limit}")
    with stderr.status("building the standard-library instruction set"):
        questions = held_out(stdlib_instructions(), _load(args))
    if not questions:
        raise UserError(f"--config: {args.config} holds out no stdlib:instruct questions")
    engine = _eval_engine(args)
    count = min(len(questions), args.limit)
    with stderr.status(f"instruct: {count} held-out questions through the engine"):
        result = run_instruct(engine, questions, args.limit, args.seed, score_answers=True)
    if not args.json:
        for kind in KINDS:
            print(
                f"{kind:<10} {result.accuracy(kind):6.1%} exact match "
                f"({result.correct[kind]}/{result.total[kind]})"
            )
        print(f"{'all':<10} {result.accuracy():6.1%} exact match")
        mean = sum(result.answer_loss) / len(result.answer_loss)
        print(f"reference answers' loss {mean:.3f} nats a token (teacher-forced)")
    return result.to_json()


def _vision(args: argparse.Namespace) -> dict:
    import torch

    from moegpt.config import FASHION_CORPUS, RENDERED_CORPUS, WORD_LINES_CORPUS
    from moegpt.evals.vision import (
        classify,
        gate_values,
        held_out_items,
        per_class_line,
        transcribe,
    )
    from moegpt.serve.engine import folder_tokenizer, weights_dtype
    from moegpt.weights import check_folder, load_vision

    if not args.config:
        raise UserError(
            f"--config: the {args.task} task needs the vision recipe that held out its items"
        )
    if args.limit <= 0:
        raise UserError(f"--limit: must be positive, got {args.limit}")
    try:
        shots = [int(v) for v in args.shots.split(",")]
    except ValueError:
        shots = [-1]
    if not shots or min(shots) < 0:
        raise UserError(f"--shots: expected counts of 0 or more, got {args.shots!r}")
    # Where and in what precision the engine would serve it: the GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = _load(args)
    dtype = weights_dtype(config.serve, device)
    vision = check_folder(args.model_dir, verify=False).vision
    if vision is not None and config.vision.image_size != vision.image_size:
        raise UserError(
            f"--config: vision.image_size {config.vision.image_size}, but the model reads "
            f"{vision.image_size}-pixel images"
        )
    path = FASHION_CORPUS
    if args.task == "transcribe":
        path = RENDERED_CORPUS if args.lines == "code" else WORD_LINES_CORPUS
    # Before the model is on the GPU: drawing them again starts worker processes.
    items = held_out_items(config, path, args.limit)
    with stderr.status(f"loading {args.model_dir}"):
        model = load_vision(args.model_dir, device=device, dtype=dtype)
    tokenizer, _ = folder_tokenizer(args.model_dir)
    if tokenizer is None:
        raise UserError(f"{args.model_dir}: the {args.task} task needs the model's tokenizer.json")
    if len(items.captions) < args.limit:
        stderr.print(
            f"{path}: the recipe holds out {len(items.captions)} items (--limit {args.limit})",
            highlight=False,
        )
    if args.task == "classify" and max(shots) > len(items.train_captions):
        raise UserError(
            f"--shots: {max(shots)} exceeds the {len(items.train_captions)} training canvases"
        )
    result: dict = {"device": device, "gates": gate_values(model)}
    if args.task == "transcribe":
        with stderr.status(f"transcribe: {len(items.captions)} held-out lines"):
            result["transcribe"] = found = transcribe(model, tokenizer, items)
        if not args.json:
            print(
                f"character error rate {found['character_error_rate']:.1%} over {found['lines']} "
                f"held-out lines; {found['exact_match']:.1%} transcribed exactly"
            )
            for example in found["worst"]:
                print(f"  {example['line']!r} -> {example['transcribed']!r}")
    else:
        result["classify"] = []
        for count in shots:
            with stderr.status(f"classify: {len(items.captions)} canvases, {count}-shot"):
                found = classify(model, tokenizer, items, count, args.seed)
            result["classify"].append(found)
            if not args.json:
                print(f"{count}-shot accuracy {found['accuracy']:.1%} over {found['items']} items")
                print("  by class: " + per_class_line(found["per_class"]))
    if not args.json:
        for layer, gates in result["gates"].items():
            print(
                f"gates before layer {layer}: attention {gates['attention']:+.4f}, "
                f"feed-forward {gates['ffn']:+.4f}"
            )
    return result


def _eval_engine(args: argparse.Namespace) -> Engine:
    """The serving engine over ``args.model_dir`` with the ``[serve]`` settings of
    ``--config`` and the ``--serve.*`` overrides (no step-time calibration: evaluations have
    no latency bound)."""
    from moegpt.serve.engine import Engine

    serve = dataclasses.replace(_load(args).serve, calibrate=False)
    with stderr.status(f"loading {args.model_dir}"):
        return Engine.from_folder(args.model_dir, serve)


def _passkey(args: argparse.Namespace, lengths: list[int]) -> dict:
    from moegpt.evals.passkey import run_passkey, table

    try:
        depths = [int(d) / 100 for d in args.depths.split(",") if d.strip()]
    except ValueError:
        depths = []
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise UserError(f"--depths: percentages from 0 to 100, got {args.depths!r}")
    if args.trials <= 0:
        raise UserError(f"--trials: must be positive, got {args.trials}")
    engine = _eval_engine(args)
    cells = len(lengths) * len(depths) * args.trials
    with stderr.status(f"passkey: {cells} prompts through the engine"):
        result = run_passkey(engine, lengths, depths, args.trials, args.seed, args.chat)
    if not args.json:
        print(table(result))
    if args.plot:
        from moegpt.evals.heatmap import save_heatmap

        save_heatmap(result, Path(args.plot), f"passkey: {Path(args.model_dir).resolve().name}")
        stderr.print(f"wrote {args.plot}", highlight=False)
    return result.to_json()


def _perplexity(args: argparse.Namespace, lengths: list[int]) -> dict:
    from moegpt.evals.perplexity import perplexity
    from moegpt.serve.engine import folder_tokenizer

    if not args.text:
        raise UserError("--text: the perplexity task needs held-out documents (--text FILE)")
    if min(lengths) < 2:
        raise UserError(
            f"--lengths: a window of {min(lengths)} token scores nothing; use 2 or more"
        )
    if args.stride is not None and args.stride <= 0:
        raise UserError(f"--stride: must be positive, got {args.stride}")
    stride = args.stride or min(lengths) // 2
    if stride > min(lengths):
        raise UserError(f"--stride: {stride} exceeds the shortest length ({min(lengths)})")
    tokenizer, _ = folder_tokenizer(args.model_dir)
    if tokenizer is None:
        raise UserError(f"{args.model_dir}: the perplexity task needs the model's tokenizer.json")
    documents = []
    for name in args.text:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--text: {path} not found")
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) < 2:  # nothing to score: a perplexity of 1.0 would say the opposite
            raise UserError(f"--text: {path} holds {len(ids)} tokens; it needs 2 or more")
        documents.append(ids)
    engine = _eval_engine(args)
    context = engine.model.config.max_seq_len
    if max(lengths) > context:
        raise UserError(f"--lengths: {max(lengths)} exceeds the model's context ({context})")
    rows = []
    for length in lengths:
        with stderr.status(f"perplexity at {length} tokens (stride {stride}) through the engine"):
            value, scored = perplexity(engine, documents, length, stride)
        rows.append({"length": length, "perplexity": value, "tokens": scored})
        if not args.json:
            print(f"length {length:>6}: perplexity {value:10.3f} over {scored:,} tokens")
    return {"task": "perplexity", "stride": stride, "documents": args.text, "results": rows}


def cmd_quickstart(args: argparse.Namespace) -> None:
    from moegpt.quickstart import quickstart

    quickstart(_load(args), Path(args.run_dir), steps=args.steps)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from moegpt.plan.hardware import PRESETS
    from moegpt.plan.memory import STATE_PRECISIONS

    gpus = ", ".join(PRESETS)
    train = parser.add_argument_group("training cluster")
    train.add_argument("--gpu", help=f"training GPU preset ({gpus}); default h100-sxm")
    train.add_argument("--gpus", type=int, help="GPU count (default: the layout's world size)")
    train.add_argument("--mfu", type=float, help="model FLOPs utilisation (default 0.4)")
    train.add_argument("--days", type=float, help="instead of --mfu: the MFU this duration implies")
    train.add_argument("--tokens", type=float, help="token budget (default: steps x batch x seq)")
    train.add_argument("--precision", choices=("bf16", "fp8"), help="peak used for MFU")
    train.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default from [parallel])")
    recompute = train.add_mutually_exclusive_group()
    recompute.add_argument(
        "--recompute", action="store_true", default=None, help="activation recomputation on"
    )
    recompute.add_argument(
        "--no-recompute",
        dest="recompute",
        action="store_false",
        help="activation recomputation off",
    )
    train.add_argument(
        "--states",
        choices=tuple(STATE_PRECISIONS),
        help="bytes per parameter of weights/grads/optimizer",
    )
    hw = parser.add_argument_group("hardware overrides (applied to both presets)")
    hw.add_argument("--peak-tflops", type=float, help="dense bf16 peak, TFLOP/s")
    hw.add_argument("--hbm-gb", type=float, help="device memory, GB")
    hw.add_argument("--hbm-tbps", type=float, help="memory bandwidth, TB/s")
    hw.add_argument("--price", type=float, help="dollars per GPU-hour")
    serve = parser.add_argument_group("inference cluster")
    serve.add_argument("--infer-gpu", help="serving GPU preset (default: --gpu)")
    serve.add_argument("--infer-tp", type=int, help="tensor parallel (default serve.tp)")
    serve.add_argument("--infer-pp", type=int, help="pipeline stages (default serve.pp)")
    serve.add_argument(
        "--infer-batch", type=int, help="sequences in flight (default: most that fit)"
    )
    serve.add_argument(
        "--context", type=int, help="tokens per sequence (default model.max_seq_len)"
    )
    serve.add_argument("--infer-precision", choices=("bf16", "fp8"), help="weights and compute")
    serve.add_argument("--infer-mfu", type=float, help="share of peak FLOP/s reached (default 1)")
    serve.add_argument("--infer-mbu", type=float, help="share of bandwidth reached (default 1)")
    serve.add_argument("--reserve", type=float, help="share of memory kept free (default 0.1)")
    vision = parser.add_argument_group("vision stage (with [vision] enabled)")
    vision.add_argument(
        "--vision-tokens",
        type=float,
        help="interleaved tokens of the Flamingo stage (default 2e12)",
    )
    vision.add_argument(
        "--tokens-per-image", type=float, help="text tokens per image in it (default 256)"
    )
    parser.add_argument(
        "--against-seeds",
        action="store_true",
        help="print GPT-4's published figures beside the computed ones",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moegpt",
        allow_abbrev=False,  # "--model.x" overrides must never be taken for an abbreviated option
        description="Plan, pretrain, extend, tune and serve a sparse GPT-4-style MoE model.",
        epilog=OVERRIDES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"moegpt {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    model = verbs.add_parser("model", help="inspect a model config", description="Inspect a model.")
    model_verbs = model.add_subparsers(dest="model_verb", metavar="ACTION", required=True)
    summary = model_verbs.add_parser(
        "summary",
        help="layers, total/active parameters and KV-cache bytes per token of a config",
        description="Print a config's layer table, total and active parameter counts and KV-cache "
        "bytes per token. The model is built on the meta device, so any size works.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(summary)
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    summary.set_defaults(func=cmd_model_summary, takes_overrides=True)

    config = verbs.add_parser("config", help="show a resolved recipe", description="Recipes.")
    config_verbs = config.add_subparsers(dest="config_verb", metavar="ACTION", required=True)
    show = config_verbs.add_parser(
        "show",
        help="print the resolved config as TOML, every field documented",
        description="Print a recipe with overrides applied, as TOML that loads back unchanged, "
        "with each field's meaning as a comment.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(show)
    show.add_argument("--bare", action="store_true", help="omit the field comments")
    show.set_defaults(func=cmd_config_show, takes_overrides=True)

    plan = verbs.add_parser(
        "plan",
        help="parameters, FLOPs, training time/cost/memory, KV cache and serving cost of a config",
        description="Plan a model on paper: parameter counts by component, FLOPs per token, "
        "training days, GPU-hours and cost, memory per GPU for the [parallel] layout, KV-cache "
        "sizes and a decode roofline with its cost per 1k tokens. Everything is derived from "
        "the config and GPU presets; --against-seeds compares with GPT-4's leaked figures.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(plan)
    _add_plan_arguments(plan)
    plan.set_defaults(func=cmd_plan, takes_overrides=True)

    prep = verbs.add_parser(
        "prepare",
        help="train or load the tokenizer and write token shards for the recipe's sources",
        description="Tokenize every [[data.sources]] entry into data.data_dir: a byte-level BPE "
        "is trained on the training split unless data.tokenizer names one, documents are "
        "tokenized by worker processes and written as memory-mappable shards with a manifest. "
        "Re-running does only what changed.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(prep)
    prep.set_defaults(func=cmd_prepare, takes_overrides=True)

    data = verbs.add_parser("data", help="inspect prepared data", description="Prepared data.")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    inspect = data_verbs.add_parser(
        "inspect",
        help="sources, tokens, epochs and shares of the mixture, with decoded samples",
        description="Verify the shards and print, per source, documents and tokens (training / "
        "validation), epochs, planned tokens and share of the mixture, how much of it the "
        "configured run reads, and a few decoded training sequences.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--samples", type=int, default=2, help="decoded sequences to show")
    inspect.set_defaults(func=cmd_data_inspect, takes_overrides=True)

    train = verbs.add_parser(
        "train",
        help="train a recipe, resuming from its newest checkpoint",
        description="Train the recipe's model on its prepared data (run `moegpt prepare` "
        "first). Writes metrics.jsonl and checkpoints into the run directory and resumes from "
        "the newest complete checkpoint there.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(train)
    train.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    train.add_argument(
        "--resume",
        choices=("auto", "never"),
        default="auto",
        help="auto: continue from the newest checkpoint whose files match their manifest "
        "(default; damaged ones are moved to checkpoints/damaged/, and if none is usable the run "
        "refuses to start). never: train from step 0 (refused while a usable checkpoint exists)",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print the batch-size and learning-rate schedule, do not train",
    )
    train.add_argument(
        "--memory-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on GPUs, refuse before launch a layout whose planned peak memory per GPU "
        "(`moegpt plan`'s figure) exceeds the GPU's by more than 15%%, and warn nearer the "
        "edge (default: on; not judged with train.freeze or vision, which the plan omits)",
    )
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="relaunch after a crash up to N times (resuming each time)",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="ranks to start on this machine through torchrun (default: the [parallel] "
        "layout's world size; under an outside torchrun this process is one rank)",
    )
    train.set_defaults(func=cmd_train, takes_overrides=True)

    gen = verbs.add_parser(
        "generate",
        help="generate text from an exported model with the serving engine",
        description="Continue each --prompt (or standard input) with the continuous-batching "
        "engine over MODEL_DIR (an exported folder: model.safetensors, config.json, "
        "tokenizer.json). One prompt streams to the terminal as it is generated.",
        epilog=SERVE_OVERRIDES_HELP,
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR")
    _add_config_argument(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (64)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (0.8)")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt (share its KV blocks)")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--logprobs", type=int, help="log-probabilities of N alternatives")
    gen.add_argument(
        "--ignore-eos", action="store_true", help="keep going past end-of-text (benchmarks)"
    )
    gen.add_argument(
        "--image",
        action="append",
        metavar="FILE",
        help="a PNG or JPEG for a vision model, before each prompt's text (repeatable, "
        "at most serve.max_images)",
    )
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through the model's own chat template "
        "(tokenizer_config.json), as /v1/chat/completions does; stop at its end of turn",
    )
    _add_serve_flags(gen)
    gen.set_defaults(func=cmd_generate, takes_overrides=True)

    srv = verbs.add_parser(
        "serve",
        help="serve an exported model over an OpenAI-compatible HTTP API",
        description="Serve MODEL_DIR (an exported folder) at /v1/completions, "
        "/v1/chat/completions and /v1/models, with /health and Prometheus /metrics. Binds "
        "127.0.0.1 unless --host says otherwise; SIGTERM lets running requests finish (up to "
        "30 s) and cancels the rest.",
        epilog=SERVE_OVERRIDES_HELP,
    )
    srv.add_argument("model_dir", metavar="MODEL_DIR")
    _add_config_argument(srv)
    srv.add_argument("--host", help="address to bind (default serve.host, 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    srv.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every path but /health and /metrics "
        "(/v1, /docs, /redoc, /openapi.json); or MOEGPT_API_KEY",
    )
    srv.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body read; larger ones get 413 (default serve.max_body_bytes, 8 MiB)",
    )
    srv.add_argument(
        "--max-waiting",
        type=int,
        help="requests that may wait for the engine (being read, tokenized, queued or "
        "preempted); more get 503 with Retry-After (default serve.max_waiting, 256; 0 = no limit)",
    )
    srv.add_argument("--served-model-name", help="the model id clients use (the folder name)")
    _add_serve_flags(srv)
    srv.set_defaults(func=cmd_serve, takes_overrides=True)

    export = verbs.add_parser(
        "export",
        help="write a serving checkpoint from a run's newest checkpoint",
        description="Write model.safetensors, config.json and tokenizer.json from the newest "
        "complete checkpoint of RUN_DIR into OUT_DIR (loadable by moegpt.load, convertible "
        "with `moegpt convert`; a vision run's folder also has its vision parts and a vision "
        "section, for `moegpt eval --task transcribe|classify` and train.init_from).",
    )
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    export.set_defaults(func=cmd_export, takes_overrides=False)

    report = verbs.add_parser(
        "report",
        help="plot a run's metrics (PNG) and summarise it",
        description="Write loss.png, eval_loss.png, throughput.png, expert_load.png and "
        "summary.txt into RUN_DIR from its metrics.jsonl.",
    )
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report, takes_overrides=False)

    ev = verbs.add_parser(
        "eval",
        help="evaluations: passkey retrieval, sliding-window perplexity, instruction following, "
        "and a vision model's transcription and classification",
        description="Evaluate an exported model folder. passkey: a random 5-digit key hidden "
        "at each depth of filler text at each length (prompt plus answer), --trials prompts "
        "per cell, answered greedily on the serving engine, exact match. perplexity: "
        "sliding-window perplexity of --text documents at each length (a window advances by "
        "--stride and scores only tokens the previous one did not). instruct: exact match on "
        "the standard-library questions of the modules --config's split holds out, by kind, "
        "and the reference answers' teacher-forced loss. "
        "transcribe (a vision model): character error rate of greedy transcriptions of the "
        "rendered lines --config's split holds out. classify (a vision model): accuracy of "
        "likelihood classification of the items of held-out Fashion-MNIST canvases, after "
        "--shots training canvases. Both also print the cross-attention gates. The engine "
        "(and the vision tasks' dtype) takes --config's [serve] settings and --serve.KEY=VALUE "
        "overrides, e.g. --serve.max_tokens_per_step=32768 to prefill long prompts whole.",
    )
    ev.add_argument("model_dir", metavar="MODEL_DIR", help="an exported model folder")
    ev.add_argument(
        "--task",
        choices=["passkey", "perplexity", "instruct", "transcribe", "classify"],
        required=True,
        help="what to measure",
    )
    ev.add_argument(
        "--lengths", default="256,512,1024", help="context lengths in tokens (256,512,1024)"
    )
    ev.add_argument(
        "--depths", default="0,25,50,75,100", help="passkey depths in percent (0,25,50,75,100)"
    )
    ev.add_argument("--trials", type=int, default=5, help="passkey prompts per cell (5)")
    ev.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the passkeys, the instruct sample and the classify shots (0)",
    )
    ev.add_argument("--text", action="append", help="perplexity: a document (repeatable)")
    ev.add_argument("--stride", type=int, help="perplexity: window step (half the shortest length)")
    ev.add_argument(
        "--config",
        metavar="TOML",
        help="instruct: the tuning recipe, whose validation split of its stdlib:instruct "
        "source gives the held-out modules; transcribe, classify: the vision recipe, whose "
        "image_text source's validation split gives the held-out items",
    )
    ev.add_argument(
        "--limit",
        type=int,
        default=300,
        help="instruct: held-out questions asked; transcribe, classify: held-out items (300)",
    )
    ev.add_argument(
        "--shots", default="0,4", help="classify: training canvases before each query (0,4)"
    )
    ev.add_argument(
        "--lines",
        choices=["code", "words"],
        default="code",
        help="transcribe: the held-out lines of the recipe's stdlib:rendered source (code, as "
        "written) or of its stdlib:rendered-words source (words in a random order, which "
        "must be read: no recall helps)",
    )
    ev.add_argument(
        "--chat",
        action="store_true",
        help="passkey: ask as a user turn of the model's chat template (instruction-tuned "
        "models, as RULER asks them), the answer in the assistant's words within 32 tokens",
    )
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.add_argument("--plot", metavar="PNG", help="passkey: save an accuracy heatmap")
    ev.set_defaults(func=cmd_eval, takes_overrides=True)

    quick = verbs.add_parser(
        "quickstart",
        help="prepare the bundled corpus, train the tiny model on CPU, evaluate, export, sample",
        description="The end-to-end tour on a fresh machine: prepare the default corpus, "
        "train configs/tiny.toml (or --config) with a progress bar, evaluate on held-out text, "
        "export a serving checkpoint and print a few samples.",
        epilog=OVERRIDES_HELP,
    )
    _add_config_argument(quick)
    quick.add_argument("--run-dir", default="runs/quickstart", help="default: runs/quickstart")
    quick.add_argument("--steps", type=int, help="override train.steps")
    quick.set_defaults(func=cmd_quickstart, takes_overrides=True)

    conv = verbs.add_parser(
        "convert",
        help="convert checkpoints between moegpt and Hugging Face Mixtral/Llama",
        description="Convert a checkpoint folder. A Hugging Face Mixtral or Llama folder "
        "(config.json + safetensors) becomes a moegpt folder (config.json + model.safetensors), "
        "and back. Tokenizer files are copied along.",
    )
    conv.add_argument("src", help="source checkpoint folder")
    conv.add_argument("dst", help="destination folder (must not exist unless --force)")
    conv.add_argument(
        "--to",
        choices=("moegpt", "mixtral", "llama"),
        help="target format (default: moegpt from Hugging Face; mixtral or llama from moegpt)",
    )
    conv.add_argument("--force", action="store_true", help="replace an existing destination")
    conv.set_defaults(func=cmd_convert, takes_overrides=False)

    up = verbs.add_parser(
        "upcycle",
        help="turn a dense model into a Mixture-of-Experts (sparse upcycling)",
        description="Write to DST the MoE version of the dense model folder SRC: every "
        "feed-forward layer becomes EXPERTS copies of itself behind a new router (top-K, "
        "weights renormalised), so the upcycled model computes what SRC does until it trains "
        "(Komatsuzaki et al. 2022). The tokenizer and chat template are copied along.",
    )
    up.add_argument("src", help="a dense moegpt model folder")
    up.add_argument("dst", help="destination folder (must not exist unless --force)")
    up.add_argument("--experts", type=int, default=8, help="experts per layer (8)")
    up.add_argument("--top-k", type=int, default=2, help="experts each token uses (2)")
    up.add_argument(
        "--noise", type=float, default=0.0, help="std of Gaussian noise added to each copy (0)"
    )
    up.add_argument("--seed", type=int, default=0, help="seed of the routers and the noise")
    up.add_argument("--force", action="store_true", help="replace an existing destination")
    up.set_defaults(func=cmd_upcycle, takes_overrides=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # `kill -USR1 PID` prints every thread's stack and the run goes on: where a stuck run waits.
    # To the process's own stderr (file descriptor 2), which a caller's sys.stderr may not be.
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # to relaunch under torchrun
    try:
        code = args.func(args)
    except UserError as e:
        print(f"moegpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moegpt: interrupted", file=sys.stderr)
        return 130
    except TrainingStopped as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says so
            print(f"moegpt: {e}", file=sys.stderr)
        return e.status
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
