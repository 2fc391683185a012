"""Every command of README.md and docs/*.md runs as written.

The ```bash blocks are read from the documents themselves, so a command that is added, changed or removed
there is run here, or makes this test fail until it is listed in `HOW` below. Each command runs in a copy of
the repository that holds the placeholders the documents use (`path/to/llama`, `my_text.txt`, `data/*.txt`,
`my-flex`, `chats.jsonl`, a small Shakespeare-shaped corpus in `.cache/shakespeare`), in document order (the
documents are written so that a command's inputs come from the commands above it). Expensive commands get tiny
sizes only through the environment variables and flags the documents describe (`FLEX_STEPS`, `FLEX_ARGS`,
`--max_steps`, ...); a command that cannot run on this machine is listed with the reason. The main job
(`bash run_pipeline.sh`) runs on the real parent, SmolLM2-135M, for two steps.
`README_SKIP=<regex>` skips the matching commands (and `README_SKIP='^bash run_pipeline|runs/pipeline'` what
depends on the main job), for a quicker look while editing the documents.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, play_text, tiny_llama

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# tiny sizes for training/run.py and training/sft.py: all documented flags (`--help`, training/arguments.py)
TRAIN = ("--max_steps 2 --block_size 32 --calibration_samples 4 --score_samples 2 --top_k 2 --max_eval_samples 2 "
         "--per_device_train_batch_size 2 --per_device_eval_batch_size 2 --save_strategy no --logging_steps 1 "
         "--report_to none")
SFT = ("--max_steps 2 --per_device_train_batch_size 2 --per_device_eval_batch_size 2 --max_length 48 "
       "--logging_steps 1 --report_to none")


@dataclass
class How:
    """How one documented command runs here: flags appended, environment added, in the background (a server),
    what it must leave behind, or why it is not run."""

    append: str = ""
    env: dict = field(default_factory=dict)
    background: bool = False
    makes: tuple[str, ...] = ()
    check: Callable[[Path], None] | None = None
    skip: str = ""


def trained_under_zero3(root: Path) -> None:
    """What `deepspeed --num_gpus 2 training/run.py ...` must leave: a run over two ranks with partitioned
    parameters, in which both ranks drew the same budgets and routes."""
    summary = json.loads((root / "runs" / "flex-zero3" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero3_partitioned"], summary
    ranks = [json.loads((root / "runs" / "flex-zero3" / "logs" / f"samples-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] and ranks[0] == ranks[1]
    # cpu.yaml refits the routers when training ends (refit_routers): written into the partitioned router, the
    # saved routers' own argmax is the export at every trained budget
    from modeling_llamaflex import LlamaFlexForCausalLM

    flex = LlamaFlexForCausalLM.from_pretrained(root / "runs" / "flex-zero3")
    assert flex.model.router.trained_steps > 0
    assert [flex.architecture(b).note for b in flex.config.budgets if b < 1] == ["router"] * 4


HOW: list[tuple[str, How]] = [  # (regular expression matched against the whole command, how); document order
    (r"^bash run_pipeline\.sh", How(
        env={"FLEX_STEPS": "2", "EVAL_LIMIT": "4", "TASKS": "flex_ppl", "EVAL_BUDGETS": "0.5,1",
             "FLEX_ARGS": "--block_size 64 --calibration_samples 2 --score_samples 1 --top_k 1 --max_eval_samples 2 "
                          "--per_device_train_batch_size 2"},
        makes=("runs/pipeline/flex/README.md", "runs/pipeline/flex/eval/results.md",
               "runs/pipeline/flex/eval/accuracy_vs_params.png", "runs/pipeline/flex/sub-models/budget-0.5/config.json"))),
    (r"^bash \.ci/run", How(skip="the test runner itself: this test runs inside it")),
    (r"^python -m modeling_llamaflex convert ", How(makes=("runs/converted/config.json",))),
    (r"^python training/run\.py training/configs/cpu\.yaml --parent path/to/llama ", How(
        append=TRAIN, makes=("runs/my-flex/config.json", "runs/my-flex/sub-models/budget-0.5/config.json"))),
    (r"^python -m modeling_llamaflex architecture ", How()),
    (r"^python -m modeling_llamaflex extract .*--compensate_on ", How(append="--num_samples 4 --seq_len 32",
                                                                       makes=("runs/half/config.json",))),
    (r"^python -m modeling_llamaflex extract --model runs/my-flex ", How(makes=("runs/subs",))),
    (r"^python training/run\.py training/configs/cpu\.yaml$", How(append=TRAIN, makes=("runs/flex/config.json",))),
    (r"^deepspeed --num_gpus 2 training/run\.py training/configs/cpu\.yaml --deepspeed ", How(
        append=TRAIN + " --per_device_train_batch_size 1", check=trained_under_zero3)),
    (r"^deepspeed --num_gpus 8 ", How(skip="needs 8 GPUs (its parse and ZeRO-3 memory are checked in test_recipe.py)")),
    (r"^deepspeed --hostfile ", How(skip="needs several GPU nodes")),
    (r"^bash eval/run_all\.sh runs/my-flex +#", How(skip="the paper's tasks need the Hugging Face hub's data sets")),
    (r"^python eval/build_tasks\.py ", How(append="--max_examples 8", makes=("eval/tasks/local/flex_ppl.yaml",))),
    (r"^bash eval/run_all\.sh runs/my-flex --local ", How(
        append="--limit 4 --budgets 0.5,1 --tasks flex_ppl,flex_lambada", makes=("runs/my-flex/eval/results.json",))),
    (r"^python model_card/generate\.py ", How(makes=("runs/my-flex/README.md",))),
    (r"^python training/run\.py training/configs/cpu\.yaml --lora_r ", How(append=TRAIN)),
    (r"^python training/sft\.py training/configs/sft_cpu\.yaml +#", How(append=SFT)),
    (r"^python training/sft\.py training/configs/sft_cpu\.yaml --lora_r 0 ", How(append=SFT)),
    (r"^python training/sft\.py training/configs/sft_cpu\.yaml --model runs/pipeline/flex ", How(
        append=SFT, makes=("runs/pipeline/sft/config.json",))),
    (r"^python training/sft\.py --model my-flex ", How(append=SFT + " --bf16 false",  # a GPU example: bf16 off here
                                                       makes=("out/config.json",))),
    (r"^llamaflex serve runs/pipeline/flex --name flex --port 8000", How(background=True)),
    (r"^llamaflex serve .*--device cuda", How(skip="needs a GPU (--device cuda)")),
    (r"^curl ", How()),
]


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) for every command of every ```bash block, continuation lines joined."""
    found = []
    for path in DOCUMENTS:
        block = None
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                block = [] if block is None and line.strip() in ("```bash", "```sh") else None
                continue
            if block is None:
                continue
            if block and block[-1].endswith("\\"):
                block[-1] = block[-1][:-1].rstrip() + " " + line.strip()
            elif line.strip() and not line.lstrip().startswith("#"):
                block.append(line.strip())
            else:
                continue
            if not block[-1].endswith("\\"):
                found.append((path.name, block[-1]))
    return found


def without_comment(command: str) -> str:
    """The command without its trailing `# comment` (a `#` outside quotes, after a blank)."""
    quote = None
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


def how_to_run(command: str) -> How:
    matches = [how for pattern, how in HOW if re.search(pattern, command)]
    assert len(matches) == 1, f"{len(matches)} entries of HOW match this documented command: {command}"
    return matches[0]


def test_every_documented_command_is_covered():
    commands = documented_commands()
    assert len(commands) >= 20
    for _, command in commands:
        how_to_run(command)
    for pattern, _ in HOW:  # no entry outlives its command
        assert any(re.search(pattern, c) for _, c in commands), f"no documented command matches {pattern!r}"


def workspace(root: Path) -> Path:
    """A copy of the repository's tracked files and the inputs the documents name."""
    from transformers import LlamaForCausalLM

    from modeling_llamaflex import LlamaFlexForCausalLM
    from training.corpus import HELD_OUT, train_tokenizer, write_corpus

    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split("\0"):
        if name and (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    works = {name: play_text(seed=i, speeches=60) for i, name in enumerate([*HELD_OUT, "othello", "lear", "romeo"])}
    corpus = write_corpus(root / ".cache" / "shakespeare", works, source="tests/test_readme.py")
    for name in ("my_text.txt", "data/train.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus.train, root / name)
    shutil.copy(corpus.validation, root / "data" / "val.txt")
    tokenizer = train_tokenizer([corpus.train], vocab_size=300)
    llama: LlamaForCausalLM = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=2048)
    for folder in ("path/to/llama", "runs/parent"):  # the README's own Llama, and training/configs/cpu.yaml's parent
        llama.save_pretrained(root / folder)
        tokenizer.save_pretrained(root / folder)
    flex = LlamaFlexForCausalLM.from_llama(llama)
    flex.save_pretrained(root / "my-flex")
    tokenizer.save_pretrained(root / "my-flex")
    for name, n in (("chats.jsonl", 16), ("val.jsonl", 4)):
        with open(root / name, "w") as fh:
            for i in range(n):
                messages = [{"role": "user", "content": f"Who speaks line {i}?"}, {"role": "assistant", "content": "Hamlet."}]
                fh.write(json.dumps({"messages": messages}) + "\n")
    return root


def environment() -> dict:
    """This interpreter's environment (so `run_pipeline.sh` installs nothing), offline."""
    bin_dir = os.path.dirname(sys.executable)
    return {**os.environ, "VIRTUAL_ENV": sys.prefix, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def wait_for_server(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no server on port 8000 after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_every_documented_command_runs_as_written(tmp_path):
    root = workspace(tmp_path / "repo")
    env = environment()
    servers: list[subprocess.Popen] = []
    ran, skipped = [], []
    try:
        for document, command in documented_commands():
            how = how_to_run(command)
            if how.skip or (os.environ.get("README_SKIP") and re.search(os.environ["README_SKIP"], command)):
                skipped.append(command)
                continue
            line = f"{without_comment(command)} {how.append}".rstrip()
            if how.background:
                log = tmp_path / "server.log"
                servers.append(subprocess.Popen(line, shell=True, cwd=root, env={**env, **how.env},
                                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
                wait_for_server(servers[-1], log)
                ran.append(command)
                continue
            done = subprocess.run(["bash", "-c", line], cwd=root, env={**env, **how.env}, capture_output=True,
                                  text=True, timeout=1500)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{document}: `{line}` failed ({done.returncode}):\n{output[-5000:]}"
            if command.startswith("curl "):
                assert '"error"' not in done.stdout, f"{document}: `{command}` answered an error: {done.stdout[-2000:]}"
                assert done.stdout.strip(), f"{document}: `{command}` answered nothing"
            for path in how.makes:
                assert (root / path).exists(), f"{document}: `{command}` did not make {path}:\n{output[-3000:]}"
            if how.check:
                how.check(root)
            ran.append(command)
    finally:
        for server in servers:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    if not os.environ.get("README_SKIP"):
        assert len(ran) >= 15 and len(skipped) <= 6, (ran, skipped)
