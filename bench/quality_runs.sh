#!/usr/bin/env bash
# The runs behind README's quality tables, two at a time (one thread each). Each run writes its JSON under
# bench/results/quality/; `python bench/quality_table.py` prints the tables from whatever has finished.
#
#   bash bench/quality_runs.sh sweep     # learning rates on hyperbaton's val split (~1.3 h on 2 cores)
#   bash bench/quality_runs.sh lambda    # entropy_weight of GateRA on hyperbaton's val split (~20 min)
#   bash bench/quality_runs.sh main      # 3 tasks x 2 seeds x 7 methods, test split (~7.5 h of one thread, ~4 h on 2 cores)
# Finished runs (their JSON exists) are skipped, so a stage can be restarted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
STEPS=${STEPS:-100}
SWEEP_TASK=${SWEEP_TASK:-hyperbaton}
run() { echo "$@"; }
jobs_for() {
  case "$1" in
    sweep)
      for lr in 3e-4 1e-3 3e-3 1e-2; do
        for m in lora peft-hira gatera; do
          run --task "$SWEEP_TASK" --method "$m" --seed 0 --lr "$lr" --eval-split val --eval-limit 200
        done
      done
      run --task "$SWEEP_TASK" --method gatera --seed 0 --lr 3e-2 --eval-split val --eval-limit 200 ;;
    lambda)
      for l in 0 0.1 1.0; do
        run --task "$SWEEP_TASK" --method gatera --seed 0 --entropy-weight "$l" --eval-split val --eval-limit 200 \
            --out "bench/results/quality/${SWEEP_TASK}__gatera__seed0__val__lambda$l.json"
      done ;;
    main)
      # seed 0 of every method first, so that a stopped stage still leaves a balanced table
      for t in ${TASKS:-hyperbaton social_iqa strategyqa}; do run --task "$t" --method zero-shot --seed 0; done
      for s in 0 1; do
        for m in ${METHODS:-lora gatera peft-hira gatera-none gatera-threshold gatera-structure gatera-threshold-keep50}; do
          for t in ${TASKS:-hyperbaton social_iqa strategyqa}; do
            if [ "$m.$s" = gatera.0 ]; then
              run --task "$t" --method "$m" --seed "$s" --save-adapter "bench/results/quality/adapters/$t"
            else
              run --task "$t" --method "$m" --seed "$s"
            fi
          done
        done
      done ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}
jobs_for "$1" | xargs -P "${PARALLEL:-2}" -I{} sh -c \
  "$PY bench/quality.py --skip-existing --steps $STEPS {} > /dev/null 2>>bench/results/quality/errors.log || echo 'FAILED: {}' >&2"
