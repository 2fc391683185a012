#!/usr/bin/env bash
# Evaluate a LlamaFlex checkpoint with lm-eval at its explicit budgets, interpolated ones and the full model,
# then collect one results.json, a Markdown table and an accuracy-vs-parameters plot (docs/design.md, "Evaluation").
#
#   bash eval/run_all.sh MODEL_DIR [--tasks T[:SHOTS],...] [--num_fewshot N] [--local] [--task_dir DIR]
#                        [--budgets B,...] [--batch_size N] [--limit N] [--output DIR] [--device cpu]
#                        [--dtype float32] [--seed N] [--force] [--parent DIR]
#
# Defaults: the paper's tasks and shots (arc_easy, lambada_openai, piqa, winogrande 0-shot; mmlu 5-shot;
# hellaswag 10-shot); --local uses the tasks built by eval/build_tasks.py (offline). Results go to
# MODEL_DIR/eval unless --output; budgets already evaluated are skipped unless --force.
# All checks (budgets, task names, checkpoint) run in eval/plan.py before any model is loaded (exit 2).
# The Python used is $PYTHON, else `python` (the one with lm-eval installed).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: bash eval/run_all.sh MODEL_DIR [options]; the options are plan.py's (less --emit):"
    exec "$PYTHON" "$here/plan.py" --help
fi
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash eval/run_all.sh MODEL_DIR [options]   (options: $PYTHON eval/plan.py --help)" >&2
    exit 2
fi
model_dir="$1"
output=""
for ((i = 2; i <= $#; i++)); do  # only --output is needed here; plan.py parses (and checks) everything
    if [[ "${!i}" == "--output" ]]; then j=$((i + 1)); output="${!j:-}"; fi
    if [[ "${!i}" == --output=* ]]; then output="${!i#--output=}"; fi
done
output="${output:-$model_dir/eval}"

plan="$(mktemp)"
trap 'rm -f "$plan"' EXIT
"$PYTHON" "$here/plan.py" "$@" --emit "$plan"   # exits 2 with a clear message on a bad budget or task

total=$(wc -l < "$plan")
echo "== $total lm-eval call(s) to run; results in $output"
n=0
while IFS=$'\t' read -r message cmd; do
    n=$((n + 1))
    echo "== $message  (call $n/$total)"
    echo "   $cmd"
    if ! eval "$cmd" < /dev/null; then  # cmd is shlex-quoted by plan.py; stdin is not the plan
        echo "error: lm-eval failed for: $message. Finished budgets are kept; rerun to resume." >&2
        exit 1
    fi
done < "$plan"

echo "== collecting results"
"$PYTHON" "$here/collect.py" "$output" "$model_dir"
