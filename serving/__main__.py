"""`python -m serving MODEL` (= `llamaflex serve MODEL`): the OpenAI API for every budget of one elastic model.

    python -m serving runs/flex --port 8000 --name flex
    python -m serving runs/flex --measure_latency      # fill this machine's latency table first (tps: budgets)
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

logger = logging.getLogger("serving")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser(prog: str = "python -m serving") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve every budget of a LlamaFlex checkpoint, one copy of "
                                "the weights, over the OpenAI API (docs/serving.md)")
    p.add_argument("model", help="LlamaFlex checkpoint folder (elastic: loaded without a budget)")
    p.add_argument("--name", help="model name in the API (default: the folder's name); requests ask for NAME@<budget>")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="serving dtype (mem: budgets use it)")
    p.add_argument("--context", type=int, help="longest prompt + completion (default: max_position_embeddings)")
    p.add_argument("--max_batch_size", type=int, default=8, help="rows decoded together at one architecture")
    p.add_argument("--max_active", type=int, default=32, help="requests running at once, all architectures")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting; beyond it: 429")
    p.add_argument("--queue_timeout", type=float, default=30.0, help="seconds a request may wait; then: 503")
    p.add_argument("--request_timeout", type=float, default=600.0, help="seconds a request may run; then: 503")
    p.add_argument("--max_tokens_default", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--measure_latency", action="store_true",
                   help="measure every architecture's decode speed before serving (tps: budgets; cached per machine)")
    p.add_argument("--log_level", default="info")
    return p


def load(path: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "float32"):
    """The elastic model (one copy of the weights) and its tokenizer."""
    from transformers import AutoTokenizer

    from modeling_llamaflex import LlamaFlexForCausalLM

    model = LlamaFlexForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    if not model.config.elastic:
        raise SystemExit(f"{path} holds one sub-model only (saved at budget {model.config.budget!r}): serve the "
                         "elastic checkpoint")
    return model, AutoTokenizer.from_pretrained(tokenizer or path)


def build(args):
    """The server of `args`: model, tokenizer, engine, family of budgets."""
    from .api import Server, create_app
    from .engine import Engine
    from .latency import LatencyTable

    model, tokenizer = load(args.model, args.tokenizer, args.device, args.dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (model.config.pad_token_id or 0)
    engine = Engine(model, pad, args.max_batch_size, args.max_active, args.max_queue, args.queue_timeout,
                    args.request_timeout)
    latency = LatencyTable(model)
    if args.measure_latency:
        from .device_budget import ranked_architectures

        latency.measure_all([a for a, _, _ in ranked_architectures(model.config)])
    name = args.name or os.path.basename(os.path.normpath(args.model))
    server = Server(model, tokenizer, name, engine, args.context, args.max_tokens_default, latency)
    return create_app(server)


def main(argv: list[str] | None = None, prog: str = "python -m serving") -> None:
    import uvicorn

    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())


if __name__ == "__main__":
    main()
