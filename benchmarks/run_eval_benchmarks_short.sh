#!/bin/sh
# What fitted in the session: lm-eval agreement on PIQA, then the other tasks on a few examples.
set -e
cd "$(dirname "$0")/.."
export PYTHONPATH=src
date
/usr/bin/time -v nice -n 10 python benchmarks/lm_eval_agreement.py --task piqa --data-dir ../shared/data \
    --limit 60 --threads 1 --out benchmarks/results/lm_eval_agreement.json
date
/usr/bin/time -v nice -n 10 python benchmarks/eval_embedded.py --data-dir ../shared/data \
    --tasks arc_easy,boolq,winogrande,lambada_openai --limit 20 --naive-limit 8 --ppl-docs 20 --threads 1 \
    --out benchmarks/results/eval_embedded_rest.json
date
