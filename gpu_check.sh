#!/usr/bin/env bash
# GPU checks of routing + memory bank under DDP (issue 12) and of the paper's shape (issue 34). Needs one
# CUDA GPU; about 5 minutes for parts 1-3, under 8 for part 4 on an H100.
#
#     bash gpu_check.sh                                        # writes runs/gpu_check/, prints PASS/FAIL lines and JSON
#     GPU_CHECK_PARTS="paper" bash gpu_check.sh                # some parts only, of: ddp resume bench paper
#     GPU_CHECK_DRY=1 GPU_CHECK_PARTS="ddp paper" bash gpu_check.sh   # the same commands on the CPU, tiny shapes
#
# 1. torchrun --nproc_per_node=1 pretrain.py --device cuda: process group cpu:gloo,cuda:nccl, bf16
#    autocast, routing at step 2 and re-routing at 4, 8, 12, memory bank on CUDA (--memory-device
#    cuda; batches from 2 --loader-workers: spawned, pinned memory) and on the CPU (the default: its
#    gathers go over gloo).
# 2. exact resume on the GPU: 14 straight steps vs 7 steps (checkpoint at 6) + --resume. CUDA's
#    atomic-add kernels (embedding and index_add backward) are not bitwise reproducible, so the resumed
#    run is compared with a second straight run: the resume difference must stay within 2x (+1e-6) of
#    that run-to-run noise.
# 3. python bench.py on the GPU machine.
# 4. the paper's shape: BERT-base (BertConfig(), the shipped MiniLM tokenizer's 30,522 tokens, random
#    weights), 32 x 512 tokens, bf16 autocast, SDPA attention, fused AdamW. $OUT/paper_step.py times a
#    plain MLM step (eager and torch.compile'd) and a routed step per --route-scope (paths fixed: 10% of
#    each layer's FFN neurons), with the FLOPs torch.utils.flop_counter counts on the same step, MFU
#    against the card's dense bf16 peak (PEAK_BF16, found by the device name) and peak memory; then
#    bench.py --config paper's plain and readings groups (per-batch routing with the cheap attribution
#    forms) within BENCH_S seconds. One JSON: $OUT/paper.json.
# GPU_CHECK_DRY=1 runs the same commands on the CPU (--device cpu, no nvidia-smi; part 4 at a 2-layer
# shape, bench.py's plain group alone), to check the script's logic where no GPU is; its numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/gpu_check}
PARTS=${GPU_CHECK_PARTS:-ddp resume bench paper}
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  DEV=cpu
  MEMS=(cpu)
  PAPER=(--batch 2 --seq 32 --layers 2 --hidden 64 --heads 2 --intermediate 128 --steps 2)
  BENCH=(--config default --layers 2 --hidden 64 --batch 2 --seq 32 --repeats 1 --only plain)
  BENCH_S=300
else
  DEV=cuda
  MEMS=(cuda cpu)
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  PAPER=(--batch 32 --seq 512)
  BENCH=(--config paper --paper-batch 32 --paper-seq 512 --repeats 3 --only plain,readings)
  BENCH_S=330  # part 4 under 8 minutes: paper_step.py takes about 1.5 of them
fi
has() { [[ " $PARTS " == *" $1 "* ]]; }
rm -rf "$OUT" && mkdir -p "$OUT"
COMMON=(--method trelm --max-steps 14 --batch-size 8 --seq-len 64 --route-every 4 --route-warmup 2 --ig-steps 4
        --device $DEV --log-every 1 --seed 0)
TR=(torchrun --nproc_per_node=1 --master_addr 127.0.0.1)

if has ddp; then
for mem in "${MEMS[@]}"; do
  LOADER=()
  if [ "$mem" = "${MEMS[0]}" ]; then LOADER=(--loader-workers 2); fi
  "${TR[@]}" --master_port $((29500 + RANDOM % 500)) pretrain.py "${COMMON[@]}" --memory-device $mem "${LOADER[@]}" \
      --output-dir "$OUT/ddp_mem_$mem"
  python - "$OUT/ddp_mem_$mem" <<'EOF'
import json, sys
log = [json.loads(l) for l in open(sys.argv[1] + "/routing.jsonl")]
routes = [r["step"] for r in log if "attr_s" in r]
assert routes == [2, 4, 8, 12], routes
print(f"PASS ddp {sys.argv[1]}: re-routed at {routes}, jaccard {[r['jaccard_prev'] for r in log if 'attr_s' in r]}")
EOF
done
fi

if has resume; then
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
  "${TR[@]}" --master_port $((29500 + RANDOM % 500)) pretrain.py "${COMMON[@]}" --memory-device $DEV --output-dir "$OUT/$run"
done
"${TR[@]}" --master_port $((29500 + RANDOM % 500)) "$OUT/interrupted.py" "${COMMON[@]}" --memory-device $DEV \
    --save-every 6 --output-dir "$OUT/split" || true
"${TR[@]}" --master_port $((29500 + RANDOM % 500)) pretrain.py "${COMMON[@]}" --memory-device $DEV --save-every 6 \
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
fi

if has bench; then
python bench.py --workdir "$OUT/bench"
fi

if has paper; then
cat > "$OUT/paper_step.py" <<'EOF'
"""gpu_check.sh part 4: a plain MLM step (eager and torch.compile'd) and a routed step per scope of a random
BERT at --batch x --seq (BERT-base by default), bf16 autocast, as pretrain.Trainer runs them (common.load_mlm
with SDPA attention, KnowledgeMLM, make_optimizer: fused AdamW on CUDA, gradient clipping; routed:
routing.Router + optim.from_adamw, 10% of each layer's FFN neurons) -> one JSON object on stdout: seconds
per step (median of --steps after warm-up), tokens/s, FLOPs of forward + backward counted by
torch.utils.flop_counter on the same step, MFU against the card's dense bf16 peak, peak memory."""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, ".")
import common
import optim
import routing
from config import from_argv
from model import KnowledgeMLM

# dense bf16 tensor-core peak (FLOP/s) from NVIDIA's datasheets; the first key found in the device name wins
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))

p = argparse.ArgumentParser()
for flag, default in (("batch", 32), ("seq", 512), ("layers", 12), ("hidden", 768), ("heads", 12),
                      ("intermediate", 3072), ("steps", 5)):
    p.add_argument(f"--{flag}", type=int, default=default)
p.add_argument("--workdir", required=True)
a = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
peak = next(((k, v) for k, v in PEAK_BF16 if k in name), (None, None))
d = os.path.join(a.workdir, "bert-random")
tok = common.load_tokenizer(common.DEFAULT_MODEL)  # 30,522 tokens
torch.manual_seed(0)
BertForMaskedLM(BertConfig(vocab_size=len(tok), num_hidden_layers=a.layers, hidden_size=a.hidden,
                           num_attention_heads=a.heads, intermediate_size=a.intermediate)).save_pretrained(d)
mlm = common.load_mlm(d, attn_implementation="sdpa")[0].to(dev).train()
net = KnowledgeMLM(mlm)
ids = torch.randint(1000, len(tok), (a.batch, a.seq), device=dev)  # (B, T), no special token
attn = torch.ones_like(ids)
labels = torch.where(torch.rand(ids.shape, device=dev) < 0.15, ids, -100)  # (B, T): 15% MLM positions
o = from_argv([]).optim
autocast = torch.autocast(dev.type, dtype=torch.bfloat16)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step(model, opt):
    with autocast:
        loss = model(ids, attn, labels)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model, opt, warmup=2):
    """{step_s (median), step_s_range, tokens_per_s, peak_mem_bytes} of forward, backward, clip, step."""
    for _ in range(warmup):
        step(model, opt)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step(model, opt)
        sync()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"step_s": s, "step_s_range": [min(times), max(times)], "tokens_per_s": a.batch * a.seq / s,
            "peak_mem_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None}


def flops(model):
    """FLOPs of one forward + backward under bf16 autocast (the optimizer's are not counted)."""
    with FlopCounterMode(display=False) as fc:
        with autocast:
            loss = model(ids, attn, labels)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


res = {"device": name, "torch": torch.__version__, "shape": vars(a), "peak_bf16_flops": peak[1],
       "peak_source": (f"PEAK_BF16[{peak[0]!r}] (NVIDIA datasheet, dense bf16)" if peak[0]
                       else "not in PEAK_BF16: no MFU"),
       "steps": {}}
full = flops(net)
adamw = optim.make_optimizer(net.parameters(), o)
res["fused_adamw"] = bool(adamw.param_groups[0]["fused"])
res["steps"]["plain"] = {**measure(net, adamw), "flops": full}
t0 = time.perf_counter()
res["steps"]["plain_compiled"] = {**measure(torch.compile(net), optim.make_optimizer(net.parameters(), o), warmup=3),
                                  "flops": full}
res["compiled_total_s"] = time.perf_counter() - t0  # compilation included
for scope in routing.SCOPES:
    router = routing.Router(mlm, scope)
    g = torch.Generator().manual_seed(0)
    router.set_paths([torch.randperm(I, generator=g)[:I // 10].sort().values for I in router.sizes])
    opt = optim.from_adamw(optim.make_optimizer(router.trainable(), o), router)
    res["steps"][f"routed_{scope}"] = {**measure(net, opt), "flops": flops(net)}
    router.detach()
for k, r in res["steps"].items():
    r["mfu"] = r["flops"] / r["step_s"] / peak[1] if peak[1] else None
    if k.startswith("routed_"):
        res[f"{k}_step_over_plain"] = r["step_s"] / res["steps"]["plain"]["step_s"]
        res[f"{k}_step_over_plain_floor"] = r["flops"] / full  # the same ratio of counted FLOPs
print(json.dumps(res, indent=1))
EOF
python "$OUT/paper_step.py" "${PAPER[@]}" --workdir "$OUT/paper" > "$OUT/paper_step.json"
rc=0
timeout "$BENCH_S" python bench.py "${BENCH[@]}" --workdir "$OUT/paper_bench" > "$OUT/paper_bench.json" || rc=$?
python - "$OUT" "$rc" "$BENCH_S" "${BENCH[*]}" <<'EOF'
import json, sys
out, rc, limit, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
res = json.load(open(f"{out}/paper_step.json"))
text = open(f"{out}/paper_bench.json").read()
res["bench"] = {"argv": "python bench.py " + argv, "rc": rc}
if rc == 0:
    res["bench"]["result"] = json.loads(text[text.index("{\n"):])  # its JSON object, after any stray line
else:
    res["bench"]["error"] = f"timed out after {limit} s" if rc == 124 else f"exit status {rc} (its stderr is above)"
json.dump(res, open(f"{out}/paper.json", "w"), indent=1)
s = res["steps"]
mfu = s["plain"]["mfu"]
print(f"paper shape on {res['device']}: plain step {s['plain']['step_s'] * 1e3:.1f} ms, MFU "
      f"{'n/a' if mfu is None else f'{mfu:.3f}'}, peak memory {s['plain']['peak_mem_bytes']}, compiled "
      f"{s['plain_compiled']['step_s'] * 1e3:.1f} ms; routed / plain: "
      + ", ".join(f"{k[7:]} {res[k + '_step_over_plain']:.3f} (floor {res[k + '_step_over_plain_floor']:.3f})"
                  for k in s if k.startswith("routed_"))
      + f"; bench.py rc {rc}; written {out}/paper.json")
EOF
fi
echo "gpu_check.sh: all checks passed"
