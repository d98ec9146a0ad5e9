#!/bin/bash
# the new default main job, then the README's evaluation of its output
cd /tmp/default20
export PATH=/work/venv/bin:$PATH
export PYTHONPATH=/work/wt/default19/src OMP_NUM_THREADS=1
( while true; do echo "$(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 60; done ) > load.txt &
LOADER=$!
date -u > started.txt
nice -n 10 /usr/bin/time -v layerfold compress > compress.txt 2> compress.time.txt
echo "compress rc=$?" >> started.txt; date -u >> started.txt
LAYERFOLD_DATA=/work/shared/data nice -n 10 /usr/bin/time -v layerfold eval SmolLM2-135M-Instruct-replaceme-minus8 --tasks piqa,arc_easy,boolq,winogrande,lambada_openai --ppl lambada_openai --limit 200 --ppl-limit 100 --reference /work/wt/default19/benchmarks/results/variants/original.eval.json --json eval.json > eval.txt 2> eval.time.txt
echo "eval rc=$?" >> started.txt; date -u >> started.txt
kill $LOADER
