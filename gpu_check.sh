#!/usr/bin/env bash
# gpu_check.sh — every GPU target of issue 7 measured in one run on one H100/H200, in at most ~8 minutes.
#
#   bash gpu_check.sh                  # on the GPU machine; everything in runs/gpu_check, the gist in $OUT
#   bash gpu_check.sh --cpu-dry-run    # anywhere: every model becomes vit_tiny, 2 timed steps, on the CPU
#
# Targets (one 80 GB H100, bf16, 224 px, mask 0.75, norm-pix loss, synthetic data on the device):
#   ViT-L/16 batch 256 >= 3,200 img/s (MFU >= 0.40); ViT-H/14 and ViT-1B/14 MFU >= 0.45;
#   ViT-3B/14 trains on one GPU at MFU >= 0.50; the largest model that trains on one 80 GB GPU, and
#   vit_5b with FSDP2 CPU offload (its state does not fit the GPU) plus the offload smoke cases.
# Each measurement runs in its own process under `timeout`, so one failure (OOM, compile error, hang)
# costs only its own slot; a running deadline skips what no longer fits. Memory is capped at an H100's
# 79.1 GiB even on an H200, so "fits on an 80 GB GPU" means the same on either. Summary table last.
# Env: GPU_CHECK_WORK (default runs/gpu_check: every log and result), OUT (if set, at most 4 files are
# copied there: summary.md, results.json, logs.txt, profile.txt), PYTHON (default python3),
# GPU_CHECK_BUDGET_S (default 470 s of measurements), GPU_CHECK_DRY_RUN=1, GPU_CHECK_ONLY (step names to run,
# space-separated, e.g. "env largest_offload" for what a previous run skipped; the summary covers those).
set -uo pipefail
cd "$(dirname "$0")"

DRY=${GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=1
RESULTS=${OUT:-}
OUT=${GPU_CHECK_WORK:-runs/gpu_check}  # below, $OUT is this work folder
mkdir -p "$OUT"
rm -rf "$OUT"/*.log "$OUT/smoke.json" "$OUT/summary.md" "$OUT/sdpa"  # a previous run's; each sweep clears its own folder
export PYTHONUNBUFFERED=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
RESERVE_S=10  # kept for the summary
MEM_CAP_GIB=79.1
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON
elif (( DRY )) && [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
if (( DRY )); then
    export CUDA_VISIBLE_DEVICES=""
    STEPS=(--steps 2 --warmup 1)
    COMPILED=off  # inductor on a 2-core CPU takes minutes; the dry run checks the plumbing, not compile
else
    STEPS=(--steps 10 --warmup 2)  # a median of 10 steps is steady; compilation is most of each slot
    COMPILED=on
fi
model() { if (( DRY )); then echo vit_tiny; else echo "$1"; fi; }
batch() { if (( DRY )); then echo 4; else echo "$1"; fi; }
: > "$OUT/steps.tsv"
START=$SECONDS

# step NAME LIMIT_S CMD...: run CMD in its own process group under a time limit, output to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        return 98  # not selected: e.g. GPU_CHECK_ONLY="env largest_offload" reruns only those steps
    fi
    local remaining=$(( BUDGET_S - (SECONDS - START) - RESERVE_S ))
    if (( remaining < 25 )); then
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
        echo "[gpu_check] $name: skipped, ${remaining}s left of the budget"
        return 99
    fi
    (( limit > remaining )) && limit=$remaining
    local t0=$SECONDS rc
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" >> "$OUT/steps.tsv"
    echo "[gpu_check] $name: exit $rc after $(( SECONDS - t0 ))s (limit ${limit}s; $(( SECONDS - START ))s so far)"
    (( rc == 0 )) || tail -n 4 "$OUT/$name.log" | cut -c1-300
    return $rc
}

# sweep NAME LIMIT_S ARGS...: one bench.py sweep; its rows land in $OUT/NAME/bench.jsonl as they finish.
sweep() {
    local name=$1 limit=$2
    shift 2
    [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* ]] || rm -rf "${OUT:?}/$name"
    step "$name" "$limit" "$PY" bench.py sweep --out "$OUT/$name" --mem-cap-gib "$MEM_CAP_GIB" "${STEPS[@]}" "$@"
}

# ---- 0. what machine is this ----
step env 60 "$PY" - <<'EOF'
import os, subprocess, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", torch.version.hip)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "memory GiB", round(p.total_memory / 2**30, 1),
          "SMs", p.multi_processor_count)
    print("cudnn", torch.backends.cudnn.version())
    try:
        from torch.nn.attention import list_flash_attention_impls
        print("flash attention impls", list_flash_attention_impls())
    except Exception as err:
        print("flash attention impls: n/a", err)
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm", "--format=csv"],
                         capture_output=True, text=True).stdout)
else:
    print("no GPU: CPU", os.cpu_count(), "cores")
EOF

# ---- 1. correctness smoke of fsdp_setup + train_step on this one GPU, against a plain model ----
step smoke 120 env SMOKE_OUT="$OUT/smoke.json" "$PY" - <<'EOF'
import dataclasses, json, os, torch
import fsdp_setup, train
from mae import MaskedAutoencoder
from vit import get_config

torch.backends.cudnn.allow_tf32 = False  # exact fp32 references (the patch-embedding convolution)
torch.backends.cuda.matmul.allow_tf32 = False
dist = fsdp_setup.init_distributed(cpu_collectives=True)  # gloo beside nccl: the offload cases need it
dev = dist.device
vit = get_config("vit_tiny")
cfg = train.TrainConfig(model="vit_tiny", decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                        steps=10, warmup_steps=0, lr=1e-3, batch_size=8)
gen = torch.Generator(dev).manual_seed(1)
imgs = torch.randn(8, 3, 32, 32, device=dev, generator=gen)

def build(strategy, group, mp, ac, offload=False):
    c = dataclasses.replace(cfg, strategy=strategy, shard_group_size=group, mixed_precision=mp, ac=ac, cpu_offload=offload)
    return train.build_model(c, dist), c

def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for n, p in fsdp_setup.unwrap(model).named_parameters()}

def one_step(model, c):
    noise_gen = torch.Generator(dev).manual_seed(2)
    loss = train.train_step(model, train.build_optimizer(model, c), [imgs], c, 0, mask_generator=noise_gen)
    return loss.item(), full_params(model)

with torch.device(dev):  # a plain model, initialised on this device with the same seed
    reference = MaskedAutoencoder(vit, 64, 2, 4)
ref_init = full_params(reference)
ref_loss, ref_after = one_step(reference, cfg)
cases = [("full_shard", None, "fp32", "none"), ("full_shard", None, "fp32", "full"),
         ("shard_grad_op", None, "fp32", "none"), ("no_shard", None, "fp32", "2"),
         ("hybrid_shard", 1, "fp32", "none"), ("ddp", None, "fp32", "none"),
         ("full_shard", None, "bf16", "none"), ("no_shard", None, "bf16", "full"), ("ddp", None, "bf16", "none"),
         ("full_shard", None, "fp32", "none", True), ("no_shard", None, "bf16", "full", True)]  # True: cpu_offload
results, failed = [], 0
for strategy, group, mp, ac, *offload in cases:
    offload = bool(offload)
    model, c = build(strategy, group, mp, ac, offload)
    # With offload the shards must really live in host memory (and nowhere else when idle).
    placed = all(p.device.type == ("cpu" if offload else dev.type) for p in model.parameters())
    init_diff = max((full_params(model)[n] - t).abs().max().item() for n, t in ref_init.items())
    loss, after = one_step(model, c)
    diffs = torch.cat([(after[n] - t).abs().flatten() for n, t in ref_after.items()])
    step_diff = diffs.max().item()
    # AdamW's first step moves every weight by ~lr = 1e-3 times the sign of its gradient: a near-zero
    # gradient may flip sign under rounding. fp32: all but 1e-4 of the weights equal the plain model's
    # to 1e-5; bf16: the loss within 2% and no weight further off than two steps.
    off = (diffs > 1e-5).float().mean().item()
    tol_loss = 1e-5 if mp == "fp32" else 2e-2
    ok = placed and init_diff == 0 and abs(loss / ref_loss - 1) <= tol_loss and step_diff <= 2.5e-3 and (mp != "fp32" or off <= 1e-4)
    failed += not ok
    results.append(dict(strategy=strategy, shard_group_size=group, mixed_precision=mp, ac=ac, cpu_offload=offload,
                        params_placed=placed, init_diff=init_diff,
                        loss=loss, ref_loss=ref_loss, step_diff=step_diff, step_off_fraction=off, ok=ok))
    print(f"{'PASS' if ok else 'FAIL'} {strategy}:{group} {mp} ac={ac}{' offload' if offload else ''}: "
          f"params placed {placed}, init diff {init_diff:.1e}, loss {loss:.6f} "
          f"vs {ref_loss:.6f}, params after one step: max diff {step_diff:.1e}, {off:.1e} of them > 1e-5", flush=True)
    del model
# --init through CPU offload: torch's full-state-dict broadcast wants the model on one device, and
# offloaded shards live on the CPU while the buffers stay on the GPU (train.load_init_weights handles it).
with torch.device(dev):
    source = MaskedAutoencoder(vit, 64, 2, 4)
source.init_weights(seed=5)  # other weights than the seed-0 build, so the load shows
init_path = os.path.join(os.path.dirname(os.environ["SMOKE_OUT"]), "smoke_init.pth")
torch.save(source.state_dict(), init_path)
try:
    c = dataclasses.replace(cfg, strategy="full_shard", mixed_precision="fp32", cpu_offload=True, init=init_path)
    loaded = full_params(train.build_model(c, dist))
    diff = max((loaded[n] - p.detach().float()).abs().max().item() for n, p in source.named_parameters())
    ok, note = diff == 0, f"max diff {diff:.1e}"
except Exception as err:  # a failure here is a result to report, not a reason to lose the others
    ok, note = False, f"{type(err).__name__}: {err}"[:200]
failed += not ok
results.append(dict(strategy="full_shard", shard_group_size=None, mixed_precision="fp32", ac="none", cpu_offload=True,
                    case="--init with offload", note=note, ok=ok))
print(f"{'PASS' if ok else 'FAIL'} --init with cpu offload: weights as saved ({note})", flush=True)
json.dump(results, open(os.environ["SMOKE_OUT"], "w"), indent=1)
fsdp_setup.cleanup()
raise SystemExit(1 if failed else 0)
EOF

# ---- 2. the throughput targets (no_shard: one GPU, bf16 params kept between forward and backward) ----
# Targets first, then the largest models, then the eager reference and the extras: the running
# deadline skips from the end.
sweep vitl_compiled 150 --models "$(model vit_large)" --batch-sizes "$(batch 256)" --ac none --compile "$COMPILED" --profile
sweep vith_compiled 120 --models "$(model vit_huge)" --batch-sizes "$(batch 256)" --ac none --compile "$COMPILED"
sweep vit1b_compiled 120 --models "$(model vit_1b)" --batch-sizes "$(batch 256)" --ac none --compile "$COMPILED"
sweep vit3b_compiled 150 --models "$(model vit_3b)" --batch-sizes "$(batch 64)" --ac none --compile "$COMPILED"

# ---- 3. the largest model that trains on one 80 GB GPU: the planner's candidates, largest first ----
# full_shard on one GPU holds only two Blocks in bf16 at a time; checkpointing keeps activations small.
CANDIDATES=$("$PY" - "$MEM_CAP_GIB" "$DRY" <<'EOF'
import sys
import plan as planner
from vit import CONFIGS, count_params
cap, dry = float(sys.argv[1]), sys.argv[2] == "1"
if dry:
    print("vit_tiny")
    raise SystemExit
fits = []
for name in CONFIGS:
    plan = planner.PlanConfig(model=name, gpus=1, gpu_mem_gib=cap, batch_size=32, ac="full")
    est = planner.layout_estimate(plan, "full_shard", 1, planner.model_sizes(plan))
    state = est["params_gib"] + est["grads_gib"] + est["optimizer_gib"]  # all present after backward
    # The planner is within ~10% of measured peaks: let the GPU decide the close calls.
    if state < cap and est["mem_gib"] <= 1.1 * cap:
        fits.append((count_params(CONFIGS[name]), name))
print(" ".join(name for _, name in sorted(fits, reverse=True)[:2]))
EOF
)
echo "[gpu_check] largest-model candidates (planner): $CANDIDATES"
for candidate in $CANDIDATES; do
    sweep "largest_$candidate" 120 --models "$candidate" --batch-sizes "$(batch 32)" --ac full \
        --strategies full_shard --compile off --steps 3 --warmup 1
    grep -q '"status": "ok"' "$OUT/largest_$candidate/bench.jsonl" 2>/dev/null && break
done
# The largest model with FSDP2 CPU offload: vit_5b's 80 GiB of fp32 state cannot sit on an 80 GB GPU;
# offloaded it needs ~83 GiB of host memory (params and grads pinned, ~46 GiB of it with the pinned
# allocator's rounding; the device machine has 128 GiB) and ~4 GiB of GPU.
sweep largest_offload 170 --models "$(model vit_5b)" --batch-sizes "$(batch 32)" --ac full --strategies full_shard \
    --compile off --cpu-offload --steps 2 --warmup 1

# ---- 3b. CPU offload through train.py: clipping, a checkpoint mid-run and --resume = one uninterrupted run ----
offload_run() { "$PY" train.py --data synthetic --model vit_tiny --decoder-embed-dim 64 --decoder-depth 2 \
    --decoder-num-heads 4 --batch-size 8 --steps 4 --warmup-steps 1 --lr 1e-3 --workers 0 --log-every 1 \
    --cpu-offload --clip-grad 0.5 --ckpt-every 2 --recon-every 0 "$@"; }
step offload_resume 90 bash -c "$(declare -f offload_run); PY='$PY'
    rm -rf '$OUT/offload_whole' '$OUT/offload_split'
    offload_run --out '$OUT/offload_whole' &&
    offload_run --out '$OUT/offload_split' --max-steps-per-run 2 &&
    offload_run --out '$OUT/offload_split' --resume &&
    '$PY' -c \"import json, sys
runs = [[(r['step'], r['loss'], r['grad_norm']) for r in map(json.loads, open(f))] for f in sys.argv[1:]]
print(*runs, sep='\\n'); ok = len(runs[0]) == 4 and runs[0] == runs[1]
print('PASS: resumed run = uninterrupted (step, loss, grad norm)' if ok else 'FAIL'); sys.exit(0 if ok else 1)\" \
        '$OUT/offload_whole/metrics.jsonl' '$OUT/offload_split/metrics.jsonl'"

# ---- 3c. train.py's stop flag on the GPU: agreed one step late, without waiting for the queued step ----
# (the multi-rank path, on this one rank: Dist says two ranks, the all-reduce runs on the real group of one)
step stop_flag 60 "$PY" - <<'EOF'
import signal, torch
import fsdp_setup, train
dist = fsdp_setup.init_distributed()
dev = dist.device
stop = train.StopRequest(fsdp_setup.Dist(0, 0, 2, dev))
a = torch.randn(4096, 4096, device=dev)
def queue_work(n):  # a "step": a long run of GPU kernels, queued without waiting
    for _ in range(n):
        a.copy_(torch.tanh(a @ a / 64))
try:
    agreed, still_busy = [], []
    for i in range(5):
        queue_work(60 if dev.type == "cuda" else 1)
        if i == 2:
            stop.handler(signal.SIGTERM, None)
        agreed.append(stop.agreed())
        # agreed() may wait for the previous step's flag copy, never for this step: this step's kernels
        # must still be running when it returns (a .item() on the flag would have drained the queue).
        still_busy.append(dev.type == "cuda" and not torch.cuda.current_stream(dev).query())
finally:
    stop.restore()
print("agreed", agreed, "GPU still busy with the step after agreed()", still_busy)
ok = agreed == [False, False, False, True, True] and (dev.type != "cuda" or all(still_busy))
print("PASS" if ok else "FAIL")
fsdp_setup.cleanup()
raise SystemExit(0 if ok else 1)
EOF

# ---- 4. the eager reference, attention kernels at MAE's shapes, then extras while time remains ----
sweep vitl_eager 75 --models "$(model vit_large)" --batch-sizes "$(batch 256)" --ac none --compile off
if (( DRY )); then
    step sdpa 60 "$PY" bench.py sdpa --shapes 4x4x17x16 --iters 2 --out "$OUT/sdpa"
else
    step sdpa 60 "$PY" bench.py sdpa --out "$OUT/sdpa"
fi
# The attention kernel that would make ViT-L's step fastest (24 encoder + 8 decoder calls), end to end.
SDPA_PICK=$("$PY" - "$OUT/sdpa/sdpa.json" "$DRY" <<'EOF'
import json, sys
if sys.argv[2] == "1":
    print("flash")  # the dry run's shapes are not MAE's: exercise the switch only
    raise SystemExit
try:
    rows = {r["label"]: r["ms"] for r in json.load(open(sys.argv[1]))}
    enc, dec = rows["vit_large encoder"], rows["vit_large decoder"]
except (OSError, KeyError, ValueError):
    raise SystemExit
cost = {k: 24 * enc[k] + 8 * dec[k] for k in ("flash", "efficient", "cudnn") if enc.get(k) and dec.get(k)}
best = min(cost, key=cost.get) if cost else None
if best and enc.get("default") and dec.get("default") and cost[best] < 0.95 * (24 * enc["default"] + 8 * dec["default"]):
    print(best)
EOF
)
if [[ -n "$SDPA_PICK" ]]; then
    echo "[gpu_check] attention kernel faster than the default for ViT-L: $SDPA_PICK (train.py --sdpa $SDPA_PICK)"
    sweep vitl_compiled_sdpa 150 --models "$(model vit_large)" --batch-sizes "$(batch 256)" --ac none \
        --compile "$COMPILED" --sdpa "$SDPA_PICK"
fi
sweep vitl_compiled_ac 120 --models "$(model vit_large)" --batch-sizes "$(batch 256)" --ac full --compile "$COMPILED"
sweep vitl_compiled_ddp 120 --models "$(model vit_large)" --batch-sizes "$(batch 256)" --ac none --compile "$COMPILED" \
    --strategies ddp

# ---- summary, last ----
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows, exit_codes = [], {}
for step in open(os.path.join(out, "steps.tsv")):  # in the order they ran
    name, code, _ = step.strip().split("\t")
    exit_codes[name] = {"124": "exit 124: time limit", "137": "killed (time limit)", "skipped": "skipped: time budget"}.get(code, f"exit {code}")
    path = os.path.join(out, name, "bench.jsonl")
    for line in open(path) if os.path.exists(path) else []:
        rows.append({**json.loads(line), "run": os.path.basename(os.path.dirname(path))})
by_run = {}
for r in rows:
    by_run.setdefault(r["run"], r)

def num(v, fmt):
    return "–" if v is None else format(v, fmt)

def target(run, label, img_goal=None, mfu_goal=None):
    r = by_run.get(run)
    if r is None:
        return f"| {label} | no result ({exit_codes.get(run, 'not run')}; see {run}.log) | | no |"
    if r["status"] != "ok":
        return f"| {label} | {r['status'][:60]} | | no |"
    met = (img_goal is None or r["img_per_s"] >= img_goal) and (mfu_goal is None or (r["mfu"] or 0) >= mfu_goal)
    goal = ", ".join(g for g in [f">= {img_goal:,} img/s" if img_goal else "", f"MFU >= {mfu_goal}" if mfu_goal else ""] if g)
    return (f"| {label} | {r['img_per_s']:,.0f} img/s, MFU {num(r['mfu'], '.3f')}, {num(r['peak_mem_gib'], '.1f')} GiB, "
            f"loss {r['loss']:.4f} | {goal or '–'} | {('yes' if met else 'NO') if goal else '–'} |")

env_log = os.path.join(out, "env.log")
machine = " / ".join(line.strip() for line in open(env_log) if line.startswith(("torch", "device", "no GPU"))) \
    if os.path.exists(env_log) else "?"
lines = [f"## gpu_check: {machine}", "",
         "| target | measured | goal | met |", "|---|---|---|---|",
         target("vitl_eager", "ViT-L/16 b256 eager (original MAE: 1,696)"),
         target("vitl_compiled", "ViT-L/16 b256 compiled (original MAE: 2,562)", 3200, 0.40),
         target("vith_compiled", "ViT-H/14 b256 compiled", None, 0.45),
         target("vit1b_compiled", "ViT-1B/14 b256 compiled", None, 0.45),
         target("vit3b_compiled", "ViT-3B/14 b64 compiled, one GPU", None, 0.50)]
# largest_offload is its own row below: with offload, vit_5b "trains on one GPU" says nothing about this target.
largest = [r for r in rows if r["run"].startswith("largest_") and r["run"] != "largest_offload"]
ok = [r for r in largest if r["status"] == "ok"]
tried = ", ".join(f"{r['model']} {r['status'][:20]}" for r in largest) or "not run"
lines.append(f"| largest on one 80 GB GPU (full_shard, ac full, b32) | {ok[0]['model'] + ' trains' if ok else 'none'}"
             f" (tried: {tried}) | stated | – |")
r = by_run.get("largest_offload")
if r and r["status"] == "ok":
    measured = (f"{r['model']} trains: {r['img_per_s']:,.1f} img/s, GPU peak {num(r['peak_mem_gib'], '.1f')} GiB, "
                f"host peak {num(r.get('host_peak_gib'), '.0f')} GiB")
else:
    measured = r["status"][:60] if r else f"no result ({exit_codes.get('largest_offload', 'not run')})"
lines.append(f"| vit_5b on one GPU with CPU offload (full_shard, ac full, b32) | {measured} | stated | – |")
smoke_path = os.path.join(out, "smoke.json")
if os.path.exists(smoke_path):
    smoke = json.load(open(smoke_path))
    lines.append(f"| fsdp_setup smoke vs a plain model | {sum(s['ok'] for s in smoke)}/{len(smoke)} pass | all | "
                 f"{'yes' if all(s['ok'] for s in smoke) else 'NO'} |")
else:
    lines.append("| fsdp_setup smoke vs a plain model | not run / crashed (smoke.log) | all | NO |")
for name, label in (("stop_flag", "train.py's stop flag on the GPU: one step late, no wait for the step"),
                    ("offload_resume", "--cpu-offload via train.py: clipping, checkpoint, resume = uninterrupted")):
    code = exit_codes.get(name, "not run")
    lines.append(f"| {label} | {'pass' if code == 'exit 0' else code} ({name}.log) | pass | {'yes' if code == 'exit 0' else 'NO'} |")
lines += ["", "| run | model | layout | ac | compile | SDPA | batch | status | img/s | TFLOP/s | MFU | peak GiB | plan GiB | 1st step s | J/img |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['run']} | {r['model']} | {r['layout']} | {r['ac']} | {r['compile']} | {r['sdpa']} | {r['batch_size']} | "
                 f"{r['status'][:30]} | {num(r.get('img_per_s'), ',.0f')} | {num(r.get('tflops_per_gpu'), '.1f')} | "
                 f"{num(r.get('mfu'), '.3f')} | {num(r.get('peak_mem_gib'), '.1f')} | {num(r.get('predicted_mem_gib'), '.1f')} | "
                 f"{num(r.get('first_step_s'), '.0f')} | {num(r.get('energy_j_per_img'), '.3f')} |")
sdpa_path = os.path.join(out, "sdpa", "sdpa.json")
if os.path.exists(sdpa_path):
    lines += ["", "| attention (fwd+bwd ms) | default | flash | efficient | cudnn | math | fastest |", "|---|---|---|---|---|---|---|"]
    for s in json.load(open(sdpa_path)):
        cells = " | ".join(num(s["ms"].get(k), ".3f") for k in ("default", "flash", "efficient", "cudnn", "math"))
        lines.append(f"| {s['label']} {'x'.join(map(str, s['shape']))} | {cells} | {s['fastest']} |")
lines += ["", "steps (name, exit code, seconds): " + "; ".join(
    " ".join(line.split()) for line in open(os.path.join(out, "steps.tsv")) if line.strip())]
text = "\n".join(lines)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
print("\n" + text)
EOF

# ---- the gist for the device tool, which brings back at most 8 files from $OUT ----
if [[ -n "$RESULTS" ]]; then
    mkdir -p "$RESULTS"
    cp "$OUT/summary.md" "$RESULTS/" 2>/dev/null
    "$PY" - "$OUT" "$RESULTS" <<'EOF'
import glob, json, os, sys
work, results = sys.argv[1:]
steps = open(os.path.join(work, "steps.tsv")).read().splitlines()
gist = {"steps": steps, "runs": {}}
for run in (line.split("\t")[0] for line in steps):
    path = os.path.join(work, run, "bench.jsonl")  # written row by row: complete even if the run was cut short
    if os.path.exists(path):
        gist["runs"][run] = [json.loads(line) for line in open(path) if line.strip()]
for name in ("smoke.json", "sdpa/sdpa.json"):
    if os.path.exists(os.path.join(work, name)):
        gist[name.split("/")[-1][:-5]] = json.load(open(os.path.join(work, name)))
json.dump(gist, open(os.path.join(results, "results.json"), "w"), indent=1)
with open(os.path.join(results, "logs.txt"), "w") as logs:
    for path in sorted(glob.glob(os.path.join(work, "*.log"))):
        lines = open(path, errors="replace").read().splitlines()
        logs.write(f"===== {os.path.basename(path)} ({len(lines)} lines, last 60) =====\n" + "\n".join(lines[-60:]) + "\n")
profiles = sorted(glob.glob(os.path.join(work, "vitl_compiled", "profile-*.txt")))
if profiles:
    open(os.path.join(results, "profile.txt"), "w").write(open(profiles[0]).read())
EOF
fi
