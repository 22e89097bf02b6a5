#!/bin/bash
# One device call: the whole `taiyi recipe mini` (preset full) on the GPU, logs and report back.
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore TAIYI_CACHE=/tmp/taiyi-cache TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers-0.42.1-py3-none-any.whl .whl/transformers-5.23.0-py3-none-any.whl .whl/opencc-*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; grep -m1 "model name" /proc/cpuinfo
python3 -c "import torch,diffusers,transformers,accelerate;print(torch.__version__,diffusers.__version__,transformers.__version__,accelerate.__version__,torch.cuda.is_available())"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 10 > $OUT/smi.csv 2>&1 &
R=/tmp/run
echo "setup $(( $(date +%s) - T0 )) s"
timeout ${LIMIT:-470} python3 -m taiyi.cli recipe mini --out $R --jobs 3 --threads 5 > $OUT/recipe.log 2>&1; echo "recipe rc $?"
kill %1 2>/dev/null
tail -25 $OUT/recipe.log
cd $R && tar czf $OUT/run.tgz recipe.json report.json report.md logs grids */metrics.jsonl */run_config.json 2>/dev/null
[ -d models ] && tar cf - models | split -b 15M - $OUT/models.tar.
ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
