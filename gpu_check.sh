#!/usr/bin/env bash
# GPU checks of routing + memory bank under DDP (issue 12). Needs one CUDA GPU; about 5 minutes.
#
#     bash gpu_check.sh            # writes runs/gpu_check/, prints PASS/FAIL lines and bench.py's JSON
#
# 1. torchrun --nproc_per_node=1 pretrain.py --device cuda: process group cpu:gloo,cuda:nccl, bf16
#    autocast, routing at step 2 and re-routing at 4, 8, 12, memory bank on CUDA (--memory-device
#    cuda) and on the CPU (the default: its gathers go over gloo).
# 2. exact resume on the GPU: 14 straight steps vs 7 steps (checkpoint at 6) + --resume. CUDA's
#    atomic-add kernels (embedding and index_add backward) are not bitwise reproducible, so the resumed
#    run is compared with a second straight run: the resume difference must stay within 2x (+1e-6) of
#    that run-to-run noise.
# 3. python bench.py on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/gpu_check}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
rm -rf "$OUT" && mkdir -p "$OUT"
COMMON=(--method trelm --max-steps 14 --batch-size 8 --seq-len 64 --route-every 4 --route-warmup 2 --ig-steps 4
        --device cuda --log-every 1 --seed 0)
TR=(torchrun --nproc_per_node=1 --master_addr 127.0.0.1)

for mem in cuda cpu; do
  "${TR[@]}" --master_port $((29500 + RANDOM % 500)) pretrain.py "${COMMON[@]}" --memory-device $mem \
      --output-dir "$OUT/ddp_mem_$mem"
  python - "$OUT/ddp_mem_$mem" <<'EOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1] + "/routing.jsonl")]
routes = [r["step"] for r in log if "ig_s" in r]
assert routes == [2, 4, 8, 12], routes
print(f"PASS ddp {sys.argv[1]}: re-routed at {routes}, jaccard {[r['jaccard_prev'] for r in log if 'ig_s' in r]}")
EOF
done

# exact resume: the interrupted run dies at the start of step 8 (after the step-6 checkpoint)
cat > "$OUT/interrupted.py" <<'EOF'
import sys
sys.path.insert(0, ".")
import pretrain
orig = pretrain.Trainer.train_step
def train_step(self):
    if self.step == 7:
        raise SystemExit("gpu_check: interrupted on purpose at step 7")
    return orig(self)
pretrain.Trainer.train_step = train_step
pretrain.main(sys.argv[1:])
EOF
for run in straight straight2; do
  "${TR[@]}" --master_port $((29500 + RANDOM % 500)) pretrain.py "${COMMON[@]}" --memory-device cuda --output-dir "$OUT/$run"
done
"${TR[@]}" --master_port $((29500 + RANDOM % 500)) "$OUT/interrupted.py" "${COMMON[@]}" --memory-device cuda \
    --save-every 6 --output-dir "$OUT/split" || true
"${TR[@]}" --master_port $((29500 + RANDOM % 500)) pretrain.py "${COMMON[@]}" --memory-device cuda --save-every 6 \
    --output-dir "$OUT/split" --resume
python - "$OUT" <<'EOF'
import sys
from safetensors.torch import load_file
out = sys.argv[1]
w = {r: load_file(f"{out}/{r}/final/model.safetensors") for r in ("straight", "straight2", "split")}
diff = lambda a, b: max((w[a][k].float() - w[b][k].float()).abs().max().item() for k in w[a])
noise, resume = diff("straight", "straight2"), diff("straight", "split")
print(f"resume max |dw| {resume:.3g}, run-to-run noise {noise:.3g}")
assert resume <= 2 * noise + 1e-6, "FAIL exact resume on the GPU"
print("PASS exact resume on the GPU (within CUDA's run-to-run noise)")
EOF

python bench.py --workdir "$OUT/bench"
echo "gpu_check.sh: all checks passed"
