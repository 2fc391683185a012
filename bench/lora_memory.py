"""Peak memory of elastic training: full weights against LoRA on a frozen base (routers and modulation train in both).

    python bench/lora_memory.py                      # a random 153M-parameter LlamaFlex, batch 2 x 256, fp32
    python bench/lora_memory.py --hidden 2048 --layers 16

Each mode runs in a fresh process: build the model, take `--steps` AdamW steps of soft (masked) elastic
training at budget 0.625, and report the peak resident memory (VmHWM) above a process that only builds the
model. Full training holds gradients and two Adam moments for every weight; LoRA only for the adapters,
routers and modulation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

STEP = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from modeling_llamaflex import LlamaFlexForCausalLM
mode, hidden, layers, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), head_dim=64)
model = LlamaFlexForCausalLM.from_llama(LlamaForCausalLM(config))
if mode == "lora":
    from modeling_llamaflex.lora import add_lora
    model = add_lora(model, r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                     "gate_proj", "up_proj", "down_proj"], modules_to_save=["router", "modulation"])
params = [p for p in model.parameters() if p.requires_grad]
trainable = sum(p.numel() for p in params)
if mode != "build":
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, 4096, (2, 256))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, budget=0.625, route_mode="soft", generator=g).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(hwm, trainable)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    script = STEP
    out = {}
    for mode in ("build", "full", "lora"):
        run = subprocess.run([sys.executable, "-c", script, mode, str(args.hidden), str(args.layers), str(args.steps)],
                             capture_output=True, text=True, check=True)
        hwm, trainable = map(int, run.stdout.split()[-2:])
        out[mode] = (hwm / 1024, trainable)
    base = out["build"][0]
    print(f"random LlamaFlex: hidden {args.hidden}, {args.layers} layers; batch 2 x 256; {args.steps} AdamW steps, fp32\n")
    print("| training | trainable parameters | peak RSS above the built model (MiB) | ratio to full |\n|---|---:|---:|---:|")
    for mode in ("full", "lora"):
        mib, trainable = out[mode]
        print(f"| {mode} | {trainable:,} | {mib - base:,.0f} | {(mib - base) / (out['full'][0] - base):.2f} |")


if __name__ == "__main__":
    main()
