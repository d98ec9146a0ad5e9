#!/bin/sh
# The two evaluation benchmarks, one after the other, at low priority (the machine is shared).
set -e
cd "$(dirname "$0")/.."
export PYTHONPATH=src
date
/usr/bin/time -v nice -n 10 python benchmarks/eval_embedded.py --data-dir ../shared/data --limit "${LIMIT:-100}" \
    --naive-limit "${NAIVE_LIMIT:-30}" --threads 1 --out benchmarks/results/eval_embedded.json
date
/usr/bin/time -v nice -n 10 python benchmarks/lm_eval_agreement.py --task piqa --data-dir ../shared/data \
    --limit "${AGREE_LIMIT:-150}" --threads 1 --out benchmarks/results/lm_eval_agreement.json
date
