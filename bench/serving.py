"""The server against the extracted plain Llamas, as ratios measured in one run.

    python bench/serving.py --model /tmp/flex-smol --name smollm2

* memory: peak resident memory of a fresh process running one server that answers four budgets, against the
  sum over the four budgets of a fresh process running that budget's extracted `LlamaForCausalLM` (each minus
  a process that only imports the libraries);
* speed, per budget and for the full model: time to first token and decode tokens/s of one streamed request
  through the server (HTTP, the official openai client, in this process) against the extracted plain Llama's
  `generate` in the same process, medians of `--repeats` interleaved runs;
* `--clients` concurrent clients at mixed budgets: aggregate decode tokens/s against the same requests one
  after the other through the server, and against the plain Llamas one after the other;
* device budgets: the architecture `mem:` and `tps:` pick, its measured memory (parameters of the extracted
  sub-model plus the KV cache after prefilling the stated context) and its decode speed through the server,
  against the limit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from serving.__main__ import build, parser as serve_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = r"""
import json, sys, threading, socket, time, torch
torch.set_num_threads(int(sys.argv[3]))
from transformers import LlamaForCausalLM
import modeling_llamaflex, serving.api, uvicorn, httpx2
kind, path = sys.argv[1], sys.argv[2]
if kind == "server":
    from serving.__main__ import build, parser
    budgets = sys.argv[4].split(",")
    app = build(parser().parse_args([path, "--name", "m"]))
    sock = socket.socket(); sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started: time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    for b in budgets:
        r = httpx2.post(url, json={"model": f"m@{b}", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                                   "ignore_eos": True}, timeout=600)
        assert r.status_code == 200, r.text
elif kind == "extracted":
    m = LlamaForCausalLM.from_pretrained(path).eval()
    m.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=8, min_new_tokens=8, do_sample=False)
print([int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0])  # KiB
"""


def peak_rss_mib(kind: str, path: str, threads: int, extra: str = "") -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, kind, path, str(threads), extra], capture_output=True,
                         text=True, cwd=ROOT, check=False)
    if out.returncode:
        raise RuntimeError(f"memory probe {kind} failed:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def memory(args, flex, budgets: list[float], tmp: str) -> dict:
    paths = {}
    for b in budgets:
        paths[b] = os.path.join(tmp, f"sub-{b:g}")
        flex.extract(b).save_pretrained(paths[b])
    base = peak_rss_mib("baseline", "-", args.threads)
    server = peak_rss_mib("server", args.model, args.threads, ",".join(f"{b:g}" for b in budgets)) - base
    subs = {f"{b:g}": peak_rss_mib("extracted", paths[b], args.threads) - base for b in budgets}
    total = sum(subs.values())
    return {"baseline_mib": base, "server_four_budgets_mib": server, "extracted_mib": subs,
            "extracted_sum_mib": total, "ratio_server_to_sum": server / total}


class _Times:
    """A `generate` streamer that records when each new token arrives."""

    def __init__(self):
        self.times, self.start = [], None

    def put(self, value):
        if self.start is None:
            self.start = time.perf_counter()  # the prompt
        else:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def _rates(start: float, times: list[float]) -> tuple[float, float]:
    """(time to first token in ms, decode tokens/s over the tokens after the first)."""
    return (times[0] - start) * 1e3, (len(times) - 1) / (times[-1] - times[0])


@torch.inference_mode()
def plain_run(model, ids: list[int], new: int) -> tuple[float, float]:
    rec = _Times()
    start = time.perf_counter()
    model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=rec)
    return _rates(start, rec.times)


def server_run(client, name: str, budget: str, ids: list[int], new: int) -> tuple[float, float]:
    start, times = time.perf_counter(), []
    stream = client.completions.create(model=f"{name}@{budget}", prompt=ids, max_tokens=new, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].model_extra.get("token_ids"):
            times.append(time.perf_counter())
    assert len(times) == new, f"{len(times)} tokens streamed, {new} asked"
    return _rates(start, times)


def speed(args, client, subs: dict, ids: list[int]) -> dict:
    for b, sub in subs.items():  # warm-up
        plain_run(sub, ids, 4)
        server_run(client, args.name, b, ids, 4)
    runs = {b: {"server": [], "plain": []} for b in subs}
    for _ in range(args.repeats):
        for b, sub in subs.items():
            runs[b]["server"].append(server_run(client, args.name, b, ids, args.new))
            runs[b]["plain"].append(plain_run(sub, ids, args.new))
    out = {}
    for b, r in runs.items():
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in r.items()}
        out[b] = {"server_ttft_ms": med["server"][0], "plain_ttft_ms": med["plain"][0],
                  "server_decode_tps": med["server"][1], "plain_decode_tps": med["plain"][1],
                  "decode_ratio": med["server"][1] / med["plain"][1],
                  "ttft_ratio": med["server"][0] / med["plain"][0]}
    return out


def concurrent_clients(args, client, subs: dict, ids: list[int], same: str | None = None) -> dict:
    """`--clients` streamed requests at once (mixed budgets, or all at budget `same`), against one at a time."""
    budgets = [same or list(subs)[i % len(subs)] for i in range(args.clients)]

    def one(b):
        return server_run(client, args.name, b, ids, args.new)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, budgets))
    wall = time.perf_counter() - start
    start = time.perf_counter()
    for b in budgets:
        one(b)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    for b in budgets:
        plain_run(subs[b], ids, args.new)
    plain = time.perf_counter() - start
    tokens = args.new * args.clients
    return {"clients": args.clients, "budgets": budgets, "tokens": tokens,
            "aggregate_tps": tokens / wall, "server_sequential_tps": tokens / sequential,
            "plain_sequential_tps": tokens / plain, "speedup_vs_server_sequential": sequential / wall,
            "ratio_vs_plain_sequential": plain / wall,
            "median_ttft_ms": statistics.median(r[0] for r in results),
            "median_decode_tps_per_client": statistics.median(r[1] for r in results)}


@torch.inference_mode()
def kv_bytes(flex, arch, context: int) -> int:
    from serving import batching

    _, cache, _ = batching.prefill(flex, arch, [[5] * context], 0)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def device_budgets(args, flex, client, state, ids: list[int]) -> dict:
    from serving.device_budget import memory_bytes, ranked_architectures

    full = ranked_architectures(flex.config)[0][0]
    limit_mem = 0.5 * memory_bytes(flex.config, full, args.context)["total"]
    full_tps = state.family.latency.tokens_per_second(full)
    specs = {"mem": f"mem:{limit_mem:.0f}B,context={args.context}", "tps": f"tps:{1.3 * full_tps:.0f}"}
    out = {}
    for kind, spec in specs.items():
        start = time.perf_counter()
        arch = state.family.architecture(spec)
        resolve_s = time.perf_counter() - start
        sub = flex.extract(arch)
        params = sum(p.numel() * p.element_size() for p in sub.parameters())
        measured_mem = params + kv_bytes(flex, arch, args.context)
        decode = statistics.median(server_run(client, args.name, spec, ids, args.new)[1] for _ in range(3))
        table_tps = state.family.latency.tokens_per_second(arch) if kind == "tps" else None
        limit = limit_mem if kind == "mem" else float(spec.removeprefix("tps:"))
        out[spec] = {"architecture": f"{arch.hidden}/{arch.heads}/{arch.mlp}/{arch.depth}",
                     "num_parameters": arch.num_parameters, "note": arch.note, "resolve_s": resolve_s,
                     "measured_memory_mb": measured_mem / 1e6, "server_decode_tps": decode, "table_decode_tps": table_tps,
                     "limit": limit, "meets": (measured_mem <= limit) if kind == "mem" else (decode >= limit)}
        del sub
    return out


def start_server(args):
    import uvicorn

    serve_args = serve_parser().parse_args([args.model, "--name", args.name, "--max_batch_size", "8"])
    app = build(serve_args)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return app.state.server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def table(results: dict) -> str:
    lines = ["| budget | TTFT server / plain ms | decode tok/s server / plain | ratio |", "|---|---:|---:|---:|"]
    for b, r in results["speed"].items():
        lines.append(f"| {b} | {r['server_ttft_ms']:.0f} / {r['plain_ttft_ms']:.0f} | {r['server_decode_tps']:.1f} / "
                     f"{r['plain_decode_tps']:.1f} | {r['decode_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="elastic LlamaFlex checkpoint (with its tokenizer)")
    p.add_argument("--name", default="flex", help="results go to bench/results/serving_<name>.json")
    p.add_argument("--budgets", nargs="*", type=float, help="four budgets (default: the trained ones)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="generated tokens per request")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--context", type=int, default=1024, help="context of the mem: budget")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the rest of the cores serve HTTP)")
    p.add_argument("--skip_memory", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import openai

    state, url = start_server(args)
    flex = state.model
    budgets = args.budgets or list(flex.config.budgets)[:4]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, " * 8
    ids = state.tokenizer(text)["input_ids"][: args.prompt]
    subs = {f"{b:g}": flex.extract(b).eval() for b in [*budgets, 1.0]}
    results = {"model": args.model, "name": args.name, "threads": args.threads, "prompt_tokens": len(ids),
               "new_tokens": args.new, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "dtype": str(flex.dtype), "budgets": [f"{b:g}" for b in budgets]}
    results["speed"] = speed(args, client, subs, ids)
    print(table(results), flush=True)
    four = {k: v for k, v in subs.items() if k != "1"}
    results["concurrent"] = concurrent_clients(args, client, four, ids)
    results["concurrent_same_budget"] = concurrent_clients(args, client, four, ids, same=list(four)[0])
    print(json.dumps({k: results[k] for k in ("concurrent", "concurrent_same_budget")}, indent=1), flush=True)
    results["device_budgets"] = device_budgets(args, flex, client, state, ids)
    print(json.dumps(results["device_budgets"], indent=1), flush=True)
    if not args.skip_memory:
        del subs
        with tempfile.TemporaryDirectory() as tmp:
            results["memory"] = memory(args, flex, budgets, tmp)
        print(json.dumps(results["memory"], indent=1), flush=True)
    path = os.path.join(ROOT, "bench", "results", f"serving_{args.name}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
