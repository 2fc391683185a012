"""Command line: convert a Llama parent, show architectures, extract plain Llama sub-models.

    python -m modeling_llamaflex convert --parent PARENT_DIR --calibration text.txt --out FLEX_DIR
    python -m modeling_llamaflex convert --parent model.gguf --out FLEX_DIR     # or --parent smollm2-135m
    python -m modeling_llamaflex architecture --model FLEX_DIR --budget 0.5 0.75
    python -m modeling_llamaflex extract --model FLEX_DIR --budget 0.5 --out SUB_DIR
    python -m modeling_llamaflex extract --model FLEX_DIR --budget 0.5 --out SUB_DIR --compensate_on text.txt
    python -m modeling_llamaflex parent smollm2-135m --out PARENT_DIR        # a built-in parent as a plain folder
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from . import LlamaFlexForCausalLM
from .compensation import RIDGE
from .parents import ParentFetchError

logger = logging.getLogger("modeling_llamaflex")


def calibration_blocks(tokenizer, paths: list[str], num_samples: int, seq_len: int) -> torch.Tensor:
    """`num_samples` blocks of `seq_len` token ids, taken evenly from the concatenated text files."""
    ids: list[int] = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            ids.extend(tokenizer(fh.read())["input_ids"])
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one block of --seq_len {seq_len}")
    data = torch.tensor(ids[: blocks * seq_len]).reshape(blocks, seq_len)
    step = max(1, blocks // num_samples)
    return data[::step][:num_samples]


def cmd_convert(args) -> None:
    from transformers import AutoTokenizer

    from .convert import load_llama
    from .parents import load_parent_tokenizer, resolve_parent

    source = resolve_parent(args.parent)  # a folder, a .gguf file or a built-in name (fetched once)
    parent = load_llama(source)
    elastic = json.loads(args.elastic) if args.elastic else {}
    data = None
    tokenizer = None
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    elif args.calibration or source.is_gguf:  # a GGUF carries its tokenizer: save it with the model
        tokenizer = load_parent_tokenizer(source)
    score = None
    if args.calibration:
        blocks = calibration_blocks(tokenizer, args.calibration, args.num_samples + args.score_samples, args.seq_len)
        data, score = blocks[: args.num_samples], blocks[args.num_samples :]
        score = score if len(score) else None
        print(f"calibrating on {data.shape[0]} sequences of {data.shape[1]} tokens; scoring architectures on "
              f"{len(data if score is None else score)}")
    importance = json.loads(args.importance) if args.importance and args.importance.startswith("{") else args.importance
    flex = LlamaFlexForCausalLM.from_llama(parent, data, batch_size=args.batch_size, importance=importance,
                                           score_data=score, top_k=args.top_k, norm_correction=args.norm_correction,
                                           **elastic)
    if flex.config.architecture_scores:
        from .search import format_scores

        print("one-shot architectures by measured quality (* = chosen):")
        print(format_scores(flex.config))
    flex.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(f"saved LlamaFlex model to {args.out}; choices: {flex.config.choices}; layer ranking: {flex.config.layer_ranking}")


def cmd_parent(args) -> None:
    from .parents import load_parent_model, load_parent_tokenizer, resolve_parent

    source = resolve_parent(args.parent)  # fetched once into the cache for a built-in name
    print(f"parent {source.name}: {source.file if source.is_gguf else source.path}")
    if args.out:
        if os.path.exists(os.path.join(args.out, "config.json")) and not args.overwrite:
            raise FileExistsError(f"{args.out} already holds a checkpoint; pass --overwrite to replace it")
        load_parent_model(source).save_pretrained(args.out)
        tokenizer = load_parent_tokenizer(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
        print(f"  -> {args.out} (plain LlamaForCausalLM, fp32)")


def _print_architecture(flex, budget) -> None:
    arch = flex.architecture(budget)
    print(f"budget {arch.budget:g}: {arch}")


def cmd_architecture(args) -> None:
    flex = LlamaFlexForCausalLM.from_pretrained(args.model)
    print(f"parent: {flex.config.parent_parameters():,} non-embedding parameters")
    for budget in args.budget:
        _print_architecture(flex, budget)


def cmd_extract(args) -> None:
    from transformers import AutoTokenizer

    flex = LlamaFlexForCausalLM.from_pretrained(args.model)
    outs = {}
    for budget in args.budget:  # every budget and folder is checked before anything is written
        out = args.out if len(args.budget) == 1 else os.path.join(args.out, f"budget-{budget}")
        if os.path.exists(os.path.join(out, "config.json")) and not args.overwrite:
            raise FileExistsError(f"{out} already holds a checkpoint; pass --overwrite to replace it")
        try:
            flex.architecture(budget)
        except (ValueError, TypeError) as err:
            raise type(err)(f"{err} (nothing was written: every --budget is checked first)") from None
        outs[budget] = out
    compensation = None
    if args.compensate_on:
        from . import Compensation

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError):
            raise ValueError(f"--compensate_on needs the tokenizer saved with {args.model}; there is none") from None
        blocks = calibration_blocks(tokenizer, args.compensate_on, args.num_samples, args.seq_len)
        print(f"compensation: least-squares refit of o_proj and down_proj on {blocks.shape[0]} sequences of "
              f"{blocks.shape[1]} tokens (ridge {args.ridge:g})")
        compensation = Compensation.from_data(flex, blocks, batch_size=args.batch_size, ridge=args.ridge)
    for budget, out in outs.items():
        _print_architecture(flex, budget)
        sub = flex.extract(budget, compensation=compensation)
        sub.save_pretrained(out)
        try:
            AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
        except (OSError, ValueError):
            logger.info("no tokenizer next to %s; saved the weights only", args.model)
        print(f"  -> {out} (plain LlamaForCausalLM, loads without remote code)")


def main(argv: list[str] | None = None, prog: str = "python -m modeling_llamaflex") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="a Llama checkpoint -> an elastic LlamaFlex checkpoint")
    p.add_argument("--parent", required=True,
                   help="Llama checkpoint folder, a Llama .gguf file, the built-in name smollm2-135m (or a hub id)")
    p.add_argument("--out", required=True, help="folder for the LlamaFlex checkpoint")
    p.add_argument("--calibration", nargs="*", help="text files for importance ranking (none: keep the order)")
    p.add_argument("--tokenizer", help="tokenizer (default: the parent's; a .gguf parent's is built from the file)")
    p.add_argument("--num_samples", type=int, default=256, help="calibration sequences")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--importance", help='scorer for every axis that has it (activation, taylor, drop_kl, ...) or '
                   'JSON {"heads": "taylor"}; default: the library\'s')
    p.add_argument("--score_samples", type=int, default=8,
                   help="further sequences the candidate architectures are scored on (KL to the parent)")
    p.add_argument("--top_k", type=int, default=8, help="candidates scored per budget (0: no quality ranking)")
    p.add_argument("--norm_correction", action="store_true",
                   help="RMSNorm gains per hidden width (off by default: docs/design.md, Conversion)")
    p.add_argument("--elastic", help='JSON of LlamaFlexConfig overrides, e.g. \'{"budgets": [0.5, 0.75]}\'')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("parent", help="fetch a built-in parent (smollm2-135m) or save a .gguf as a plain Llama folder")
    p.add_argument("parent", help="a built-in name, a Llama .gguf file or a checkpoint folder")
    p.add_argument("--out", help="save it here as a plain fp32 LlamaForCausalLM with its tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.set_defaults(func=cmd_parent)

    p = sub.add_parser("architecture", help="print the architecture chosen for each budget")
    p.add_argument("--model", required=True)
    p.add_argument("--budget", nargs="+", required=True, help="fractions in (0, 1] or sizes such as 3B")
    p.set_defaults(func=cmd_architecture)

    p = sub.add_parser("extract", help="save plain Llama sub-models")
    p.add_argument("--model", required=True, help="LlamaFlex checkpoint folder")
    p.add_argument("--budget", nargs="+", required=True, help="fractions in (0, 1] or sizes such as 3B")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per budget when several)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--compensate_on", nargs="+", metavar="TEXT_FILE",
                   help="refit each sub-model's o_proj and down_proj by least squares to the full model's outputs on "
                        "this text (better one-shot sub-models; the sub-model's weights are no longer a slice)")
    p.add_argument("--num_samples", type=int, default=256,
                   help="compensation sequences (256 x 256 tokens fit better than 64 x 256 on SmolLM2: bench/QUALITY.md)")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per compensation sequence")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--ridge", type=float, default=RIDGE, help="ridge λ, relative to the kept inputs' mean variance")
    p.set_defaults(func=cmd_extract)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.budget = [_number(b) for b in getattr(args, "budget", [])] if hasattr(args, "budget") else None
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ParentFetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # sizes such as "3B"; validated by parse_budget


if __name__ == "__main__":
    main()
