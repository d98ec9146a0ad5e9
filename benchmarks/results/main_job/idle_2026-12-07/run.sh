# 2026-12-07 08:35:35 UTC, main 9601a54, idle machine (no other run), default threads, calibration text and teacher logits cached
cd /tmp/idle20 && PYTHONPATH=/work/main/src /usr/bin/time -v layerfold compress -o /tmp/idle20/out --force > compress.txt 2> compress.time.txt
