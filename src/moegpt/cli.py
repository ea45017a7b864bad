"""The `moegpt` command line: one verb per stage of a model's life."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

from moegpt import __version__
from moegpt.config import Config, load_config, to_toml
from moegpt.console import stderr, stdout
from moegpt.errors import UserError

OVERRIDES_HELP = (
    "Any config field can be overridden after the options in dotted form, e.g. "
    "--model.n_layers 4 --train.lr 3e-4 (see `moegpt config show` for every field)."
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
    summary = summarize(config.model)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        args.func(args)
    except UserError as e:
        print(f"moegpt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
