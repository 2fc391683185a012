"""Sub-models in llama.cpp: export, convert with llama.cpp's own converter, run, compare with transformers.

Not part of CI: `pip install llama-cpp-python==0.3.36` builds llama.cpp from source (about 12 minutes on 2 cores).

    pip install llama-cpp-python==0.3.36 sentencepiece==0.2.3   # the converter imports sentencepiece
    python bench/llamacpp.py --model runs/flex --budgets 0.5 0.75 1

For each budget: `flex.extract(b)` saved as a plain Llama checkpoint; `convert_hf_to_gguf.py` from the
llama-cpp-python source archive (with its vendored gguf-py, fetched once into .cache/llamacpp) writes an f32
GGUF; `llama_cpp.Llama(..., logits_all=True)` with an f32 KV cache scores a prompt and generates greedily; both are compared with
transformers (fp32: logits within 1e-4, identical greedy tokens). Our tokenizer is a GPT-2-style byte-level
BPE the converter does not know by hash; it is declared as "gpt-2", which is what it is.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch

from modeling_llamaflex import LlamaFlexForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VERSION = "0.3.36"


def converter_dir(cache: str) -> str:
    """The llama.cpp sources vendored in llama-cpp-python's sdist (converter + matching gguf-py)."""
    found = glob.glob(os.path.join(cache, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if found:
        return found[0]
    os.makedirs(cache, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", cache], check=True)
    with tarfile.open(glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz"))[0]) as tar:
        tar.extractall(cache, filter="data")
    return glob.glob(os.path.join(cache, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]


def convert(llama_cpp_dir: str, hf_dir: str, out: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf in this process, declaring our byte-level BPE as gpt-2."""
    sys.path[:0] = [llama_cpp_dir, os.path.join(llama_cpp_dir, "gguf-py")]
    converter = importlib.import_module("convert_hf_to_gguf")
    try:  # newer llama.cpp keeps the model classes in a `conversion` package
        base = importlib.import_module("conversion.base").TextModel
    except ImportError:
        base = getattr(converter, "TextModel", None) or converter.Model
    base.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", "f32"]
    try:
        converter.main()
    finally:
        sys.argv = argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/flex")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.75, 1.0])
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--cache", default=os.path.join(ROOT, ".cache", "llamacpp"))
    args = parser.parse_args()
    import llama_cpp  # noqa: F401  (fails early with a clear ImportError when not installed)

    from transformers import AutoTokenizer

    src = converter_dir(args.cache)
    flex = LlamaFlexForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = open(os.path.join(ROOT, ".cache", "shakespeare", "validation.txt"), encoding="utf-8").read()[:4000]
    ids = tokenizer(text)["input_ids"][: args.prompt_tokens]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            hf_dir, gguf = os.path.join(tmp, f"b{budget}"), os.path.join(tmp, f"b{budget}.gguf")
            sub = flex.extract(budget)
            sub.save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            convert(src, hf_dir, gguf)
            llm = llama_cpp.Llama(model_path=gguf, logits_all=True, n_ctx=256, verbose=False, n_threads=2,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # f32 KV cache
            with torch.no_grad():
                ours = sub(torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)])
            same_ids = llm.tokenize(text[:300].encode(), add_bos=True, special=False) == tokenizer(text[:300])["input_ids"]
            greedy_hf = sub.generate(torch.tensor([ids]), max_new_tokens=args.new, do_sample=False)[0, len(ids):].tolist()
            llm.reset()
            greedy_cpp = []
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                greedy_cpp.append(token)
                if len(greedy_cpp) == args.new:
                    break
            rows.append((budget, sub.num_parameters(), float(np.abs(ours - theirs).max()), same_ids, greedy_hf == greedy_cpp))
    print(f"\nllama-cpp-python {llama_cpp.__version__}; prompt {len(ids)} tokens; {args.new} greedy tokens; f32 GGUF\n")
    print("| budget | parameters | max abs logit difference | same token ids | same greedy tokens |\n|---|---:|---:|---|---|")
    for budget, n, diff, same_ids, same in rows:
        print(f"| {budget:g} | {n:,} | {diff:.2e} | {same_ids} | {same} |")


if __name__ == "__main__":
    main()
