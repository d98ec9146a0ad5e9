# 2026-12-07 12:18-12:43 UTC, 2-core AMD EPYC, 24 GiB, torch 2.13.0 CPU, fp32, one thread, nice 10;
# SHARED cores, load 2.7-3.0 (two one-thread benchmark runs beside it)
cd /tmp/stream21/e2e
LAYERFOLD_DATA=/work/shared/data OMP_NUM_THREADS=1 nice -n 10 /usr/bin/time -v \
  layerfold compress --method streamline --remove 8 --train-tokens 16384 --eval-limit 50 -o /tmp/stream21/e2e/out
