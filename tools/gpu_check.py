"""gpu_check.py — every GPU target measured in one run on one H100/H200, in at most ~8 minutes.

    python tools/gpu_check.py                     # logs and results in runs/gpu_check, summary table last
    python tools/gpu_check.py --out results/      # the gist (summary.md, results.json, logs.txt, profile.txt) there
    python tools/gpu_check.py --only env largest_offload   # rerun chosen steps; the summary covers those
    python tools/gpu_check.py --cpu-dry-run       # anywhere: every model becomes vit_tiny, 2 timed steps, on the CPU
    python tools/gpu_check.py --list              # the steps and their commands, nothing run

Targets (one 80 GB H100, bf16, 224 px, mask 0.75, norm-pix loss, synthetic data on the device):
ViT-L/16 batch 256 >= 3,200 img/s (MFU >= 0.40); ViT-H/14 and ViT-1B/14 MFU >= 0.45; ViT-3B/14 trains
on one GPU at MFU >= 0.50; the largest model that trains on one 80 GB GPU; vit_5b with FSDP2 CPU
offload (its fp32 state does not fit the GPU). Beside them: tests/test_gpu.py (fsdp_setup and train.py
against a plain model on the GPU, CPU offload through train.py, the stop flag), the eager reference and
each attention kernel at MAE's shapes.

Each step runs in its own process under a time limit, so one failure (OOM, compile error, hang) costs
only its own slot; a running deadline (--budget-s of measurements) skips what no longer fits, from the
end: the targets come first. Memory is capped at an H100's 79.1 GiB even on an H200, so "fits on an
80 GB GPU" means the same on either. Every step's log and result stay in --work; steps.tsv lists
(name, exit code, seconds) in the order they ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field

# `python tools/gpu_check.py` puts tools/ on sys.path, not the repository root where vit lives: add it,
# so the script runs from any working directory.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MEM_CAP_GIB = 79.1  # an 80 GB H100's usable memory, imposed on larger cards too
RESERVE_S = 10  # of the budget, kept for the summary
MIN_SLOT_S = 25  # a step with less time left than this is skipped, not started
EXIT_TIME_LIMIT = 124  # as timeout(1) reports it


@dataclass
class Settings:
    work: str = "runs/gpu_check"  # every log and result
    out: str | None = None  # where the gist goes (default: work)
    budget_s: float = 470.0  # seconds of measurements; with the start-up and summary about 8 minutes
    dry_run: bool = False  # CPU, vit_tiny, 2 timed steps: checks the plumbing, measures nothing
    only: list[str] | None = None  # step names to run; None runs all
    python: str = sys.executable

    def model(self, name: str) -> str:
        return "vit_tiny" if self.dry_run else name

    def batch(self, size: int) -> str:
        return "4" if self.dry_run else str(size)

    @property
    def compiled(self) -> str:
        return "off" if self.dry_run else "on"  # inductor on a 2-core CPU takes minutes

    @property
    def steps(self) -> list[str]:
        # A median of 10 steps is steady; compilation is most of each slot.
        return ["--steps", "2", "--warmup", "1"] if self.dry_run else ["--steps", "10", "--warmup", "2"]


@dataclass
class Step:
    name: str
    limit_s: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of this process's environment


# ---------------------------------------------------------------------------------------------
# the steps, in order: targets first, then the largest models, the GPU tests, the extras
# ---------------------------------------------------------------------------------------------


def sweep(s: Settings, name: str, limit_s: int, *args: str) -> Step:
    """One tools/bench.py sweep; its rows land in <work>/<name>/bench.jsonl as they finish."""
    return Step(name, limit_s, [s.python, os.path.join(ROOT, "tools", "bench.py"), "sweep",
                                "--out", os.path.join(s.work, name), "--mem-cap-gib", str(MEM_CAP_GIB), *s.steps, *args])


def gpu_tests(s: Settings, name: str, limit_s: int, selection: str) -> Step:
    """Tests of tests/test_gpu.py chosen by -k; the outcome of each goes to <work>/<name>.xml."""
    return Step(name, limit_s, [s.python, "-m", "pytest", os.path.join(ROOT, "tests", "test_gpu.py"), "-q",
                                "-p", "no:cacheprovider", "-k", selection,
                                f"--junitxml={os.path.join(s.work, name + '.xml')}"])


def sweep_rows(s: Settings, name: str) -> list[dict]:
    path = os.path.join(s.work, name, "bench.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def largest_candidates(s: Settings) -> list[str]:
    """The two largest models the planner gives a chance on one capped GPU with full_shard (only two
    Blocks unsharded at a time) and activation checkpointing at batch 32, largest first."""
    if s.dry_run:
        return ["vit_tiny"]
    import plan as planner
    from vit import CONFIGS, count_params

    fits = []
    for name in CONFIGS:
        config = planner.PlanConfig(model=name, gpus=1, gpu_mem_gib=MEM_CAP_GIB, batch_size=32, ac="full")
        estimate = planner.layout_estimate(config, "full_shard", 1, planner.model_sizes(config))
        state = estimate["params_gib"] + estimate["grads_gib"] + estimate["optimizer_gib"]  # all present after backward
        # The planner is within ~10% of measured peaks: let the GPU decide the close calls.
        if state < MEM_CAP_GIB and estimate["mem_gib"] <= 1.1 * MEM_CAP_GIB:
            fits.append((count_params(CONFIGS[name]), name))
    return [name for _, name in sorted(fits, reverse=True)[:2]]


def sdpa_pick(s: Settings) -> str | None:
    """The attention kernel that would make ViT-L's step fastest (24 encoder + 8 decoder calls), if it
    beats torch's default choice by 5%; None otherwise or without a result."""
    if s.dry_run:
        return "flash"  # the dry run's shapes are not MAE's: exercise the switch only
    try:
        with open(os.path.join(s.work, "sdpa", "sdpa.json")) as f:
            rows = {r["label"]: r["ms"] for r in json.load(f)}
        encoder, decoder = rows["vit_large encoder"], rows["vit_large decoder"]
    except (OSError, KeyError, ValueError):
        return None
    cost = {k: 24 * encoder[k] + 8 * decoder[k] for k in ("flash", "efficient", "cudnn") if encoder.get(k) and decoder.get(k)}
    best = min(cost, key=cost.get) if cost else None
    if best and encoder.get("default") and decoder.get("default") and \
            cost[best] < 0.95 * (24 * encoder["default"] + 8 * decoder["default"]):
        return best
    return None


def run_all(s: Settings, run: Callable[[Step], int | None]) -> None:
    """Every step in order. `run` executes one (or, for --list and tests, pretends to); the steps after
    the largest-model search and the SDPA timing depend on what those left in the work folder."""
    m, b, compiled = s.model, s.batch, s.compiled
    # 0. what machine this is, then tests/test_gpu.py's comparison with a plain model
    run(Step("env", 60, [s.python, os.path.abspath(__file__), "--print-env"]))
    run(gpu_tests(s, "smoke", 120, "matches_plain_model or init_with_cpu_offload"))
    # 1. the throughput targets (no_shard: one GPU, bf16 params kept between forward and backward)
    run(sweep(s, "vitl_compiled", 150, "--models", m("vit_large"), "--batch-sizes", b(256), "--ac", "none",
              "--compile", compiled, "--profile"))
    run(sweep(s, "vith_compiled", 120, "--models", m("vit_huge"), "--batch-sizes", b(256), "--ac", "none", "--compile", compiled))
    run(sweep(s, "vit1b_compiled", 120, "--models", m("vit_1b"), "--batch-sizes", b(256), "--ac", "none", "--compile", compiled))
    run(sweep(s, "vit3b_compiled", 150, "--models", m("vit_3b"), "--batch-sizes", b(64), "--ac", "none", "--compile", compiled))
    # 2. the largest model that trains on one 80 GB GPU: the planner's candidates, largest first, until one does
    candidates = largest_candidates(s)
    print(f"[gpu_check] largest-model candidates (planner): {' '.join(candidates)}", flush=True)
    for candidate in candidates:
        run(sweep(s, f"largest_{candidate}", 120, "--models", candidate, "--batch-sizes", b(32), "--ac", "full",
                  "--strategies", "full_shard", "--compile", "off", "--steps", "3", "--warmup", "1"))
        if any(r["status"] == "ok" for r in sweep_rows(s, f"largest_{candidate}")):
            break
    # vit_5b's 80 GiB of fp32 state cannot sit on an 80 GB GPU; offloaded it needs ~83 GiB of host memory
    # (params and grads pinned) and ~4 GiB of GPU.
    run(sweep(s, "largest_offload", 170, "--models", m("vit_5b"), "--batch-sizes", b(32), "--ac", "full",
              "--strategies", "full_shard", "--compile", "off", "--cpu-offload", "--steps", "2", "--warmup", "1"))
    # 3. CPU offload through train.py (clipping, checkpoint, resume) and the stop flag on the GPU
    run(gpu_tests(s, "offload_resume", 90, "cpu_offload_resume"))
    run(gpu_tests(s, "stop_flag", 60, "stop_flag"))
    # 4. the eager reference, attention kernels at MAE's shapes, then extras while time remains
    run(sweep(s, "vitl_eager", 75, "--models", m("vit_large"), "--batch-sizes", b(256), "--ac", "none", "--compile", "off"))
    shapes = ["--shapes", "4x4x17x16", "--iters", "2"] if s.dry_run else []
    run(Step("sdpa", 60, [s.python, os.path.join(ROOT, "tools", "bench.py"), "sdpa", *shapes,
                          "--out", os.path.join(s.work, "sdpa")]))
    pick = sdpa_pick(s)
    if pick:
        print(f"[gpu_check] attention kernel faster than the default for ViT-L: {pick} (train.py --sdpa {pick})")
        run(sweep(s, "vitl_compiled_sdpa", 150, "--models", m("vit_large"), "--batch-sizes", b(256), "--ac", "none",
                  "--compile", compiled, "--sdpa", pick))
    run(sweep(s, "vitl_compiled_ac", 120, "--models", m("vit_large"), "--batch-sizes", b(256), "--ac", "full", "--compile", compiled))
    run(sweep(s, "vitl_compiled_ddp", 120, "--models", m("vit_large"), "--batch-sizes", b(256), "--ac", "none",
              "--compile", compiled, "--strategies", "ddp"))


# ---------------------------------------------------------------------------------------------
# running a step: its own process group, a time limit, a running deadline
# ---------------------------------------------------------------------------------------------


def run_process(argv: list[str], env: dict[str, str], limit_s: float | None, log_path: str) -> int:
    """The exit code; EXIT_TIME_LIMIT if it ran past limit_s (then its whole process group is ended:
    torch's compile workers and DataLoader workers included)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return EXIT_TIME_LIMIT
        except BaseException:  # Ctrl-C: its own session does not get SIGINT, so end it here, not leave it on the GPU
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


class Runner:
    """Runs steps in order, each in <work>/<name>.log, within the budget; appends (name, exit code or
    'skipped', seconds) to steps.tsv. `clock` and `time_limits` are there for the tests."""

    def __init__(self, s: Settings, clock=time.monotonic, time_limits: bool = True):
        self.s, self.clock, self.time_limits = s, clock, time_limits
        self.start = clock()
        os.makedirs(s.work, exist_ok=True)
        open(os.path.join(s.work, "steps.tsv"), "w").close()
        # The child processes: no GPU in a dry run; Python output unbuffered, so a log cut short by the
        # time limit still shows how far the step got.
        self.env = {"PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": ""} if s.dry_run else {})}

    def record(self, name: str, code: str, seconds: float) -> None:
        with open(os.path.join(self.s.work, "steps.tsv"), "a") as f:
            f.write(f"{name}\t{code}\t{seconds:.0f}\n")

    def __call__(self, step: Step) -> int | None:
        if self.s.only and step.name not in self.s.only:
            return None
        remaining = self.s.budget_s - (self.clock() - self.start) - RESERVE_S
        if self.time_limits and remaining < MIN_SLOT_S:
            self.record(step.name, "skipped", 0)
            print(f"[gpu_check] {step.name}: skipped, {remaining:.0f}s left of the budget", flush=True)
            return None
        limit = min(step.limit_s, remaining) if self.time_limits else None
        shutil.rmtree(os.path.join(self.s.work, step.name), ignore_errors=True)  # a previous run's sweep rows
        log_path = os.path.join(self.s.work, f"{step.name}.log")
        t0 = self.clock()
        code = run_process(step.argv, {**self.env, **step.env}, limit, log_path)
        self.record(step.name, str(code), self.clock() - t0)
        print(f"[gpu_check] {step.name}: exit {code} after {self.clock() - t0:.0f}s"
              + (f" (limit {limit:.0f}s)" if limit else ""), flush=True)
        if code != 0:
            with open(log_path, errors="replace") as f:
                print("\n".join(line[:300] for line in f.read().splitlines()[-4:]))
        return code


def print_environment() -> None:
    """The machine, for the summary's first line (run as the `env` step, in its own process)."""
    import torch

    print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", torch.version.hip)
    if not torch.cuda.is_available():
        print("no GPU: CPU", os.cpu_count(), "cores")
        return
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", f"{p.major}.{p.minor}", "memory GiB", round(p.total_memory / 2**30, 1),
          "SMs", p.multi_processor_count)
    print("cudnn", torch.backends.cudnn.version())
    try:
        from torch.nn.attention import list_flash_attention_impls
        print("flash attention impls", list_flash_attention_impls())
    except Exception as err:  # an older torch: only the report misses it
        print("flash attention impls: n/a", err)
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                              "--format=csv"], capture_output=True, text=True).stdout)


# ---------------------------------------------------------------------------------------------
# the summary: targets met or not, every sweep row, the attention kernels
# ---------------------------------------------------------------------------------------------

EXIT_WORDS = {"124": "exit 124: time limit", "137": "killed (out of memory, or from outside)", "skipped": "skipped: time budget"}


def read_steps(work: str) -> list[tuple[str, str, str]]:
    """(name, exit code or 'skipped', seconds) in the order the steps ran."""
    path = os.path.join(work, "steps.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def junit_counts(work: str, name: str) -> dict | None:
    """Counts of passed, failed and skipped tests from a gpu_tests step's JUnit XML; None if absent."""
    try:
        root = ElementTree.parse(os.path.join(work, f"{name}.xml")).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(suite.get("tests", 0)) for suite in suites)
    failed = sum(int(suite.get("failures", 0)) + int(suite.get("errors", 0)) for suite in suites)
    skipped = sum(int(suite.get("skipped", 0)) for suite in suites)
    return dict(total=total, failed=failed, skipped=skipped, passed=total - failed - skipped)


def tests_row(work: str, name: str, label: str, exit_codes: dict) -> str:
    outcome = junit_counts(work, name)
    if outcome is None:
        return f"| {label} | no result ({exit_codes.get(name, 'not run')}; see {name}.log) | all pass | NO |"
    met = outcome["total"] > 0 and outcome["passed"] == outcome["total"]
    skipped = f", {outcome['skipped']} skipped (no GPU)" if outcome["skipped"] else ""
    return f"| {label} | {outcome['passed']}/{outcome['total']} pass{skipped} | all pass | {'yes' if met else 'NO'} |"


def num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def target_row(first_rows: dict, exit_codes: dict, run: str, label: str, img_goal=None, mfu_goal=None) -> str:
    r = first_rows.get(run)
    if r is None:
        return f"| {label} | no result ({exit_codes.get(run, 'not run')}; see {run}.log) | | no |"
    if r["status"] != "ok":
        return f"| {label} | {r['status'][:60]} | | no |"
    met = (img_goal is None or r["img_per_s"] >= img_goal) and (mfu_goal is None or (r["mfu"] or 0) >= mfu_goal)
    goal = ", ".join(g for g in [f">= {img_goal:,} img/s" if img_goal else "", f"MFU >= {mfu_goal}" if mfu_goal else ""] if g)
    return (f"| {label} | {r['img_per_s']:,.0f} img/s, MFU {num(r['mfu'], '.3f')}, {num(r['peak_mem_gib'], '.1f')} GiB, "
            f"loss {r['loss']:.4f} | {goal or '–'} | {('yes' if met else 'NO') if goal else '–'} |")


def write_summary(work: str) -> str:
    """summary.md in the work folder, from steps.tsv and what each step left there; returns its text."""
    steps = read_steps(work)
    exit_codes = {name: EXIT_WORDS.get(code, f"exit {code}") for name, code, _ in steps}
    rows = []
    for name, _, _ in steps:
        path = os.path.join(work, name, "bench.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                rows += [{**json.loads(line), "run": name} for line in f if line.strip()]
    first_rows = {}
    for r in rows:
        first_rows.setdefault(r["run"], r)
    env_log = os.path.join(work, "env.log")
    machine = "?"
    if os.path.exists(env_log):
        with open(env_log) as f:
            machine = " / ".join(line.strip() for line in f if line.startswith(("torch", "device", "no GPU")))
    target = lambda *args, **goals: target_row(first_rows, exit_codes, *args, **goals)  # noqa: E731
    lines = [f"## gpu_check: {machine}", "",
             "| target | measured | goal | met |", "|---|---|---|---|",
             target("vitl_eager", "ViT-L/16 b256 eager (original MAE: 1,696)"),
             target("vitl_compiled", "ViT-L/16 b256 compiled (original MAE: 2,562)", img_goal=3200, mfu_goal=0.40),
             target("vith_compiled", "ViT-H/14 b256 compiled", mfu_goal=0.45),
             target("vit1b_compiled", "ViT-1B/14 b256 compiled", mfu_goal=0.45),
             target("vit3b_compiled", "ViT-3B/14 b64 compiled, one GPU", mfu_goal=0.50)]
    # largest_offload is its own row: with offload, "vit_5b trains on one GPU" says nothing about this target.
    largest = [r for r in rows if r["run"].startswith("largest_") and r["run"] != "largest_offload"]
    trained = [r for r in largest if r["status"] == "ok"]
    tried = ", ".join(f"{r['model']} {r['status'][:20]}" for r in largest) or "not run"
    lines.append(f"| largest on one 80 GB GPU (full_shard, ac full, b32) | "
                 f"{trained[0]['model'] + ' trains' if trained else 'none'} (tried: {tried}) | stated | – |")
    r = first_rows.get("largest_offload")
    if r and r["status"] == "ok":
        measured = (f"{r['model']} trains: {r['img_per_s']:,.1f} img/s, GPU peak {num(r['peak_mem_gib'], '.1f')} GiB, "
                    f"host peak {num(r.get('host_peak_gib'), '.0f')} GiB")
    else:
        measured = r["status"][:60] if r else f"no result ({exit_codes.get('largest_offload', 'not run')})"
    lines.append(f"| vit_5b on one GPU with CPU offload (full_shard, ac full, b32) | {measured} | stated | – |")
    lines.append(tests_row(work, "smoke", "fsdp_setup smoke vs a plain model (tests/test_gpu.py)", exit_codes))
    lines.append(tests_row(work, "offload_resume", "--cpu-offload via train.py: clipping, checkpoint, resume = "
                                                   "uninterrupted", exit_codes))
    lines.append(tests_row(work, "stop_flag", "train.py's stop flag on the GPU: one step late, no wait for the step",
                           exit_codes))
    lines += ["", "| run | model | layout | ac | compile | SDPA | batch | status | img/s | TFLOP/s | MFU | peak GiB | "
                  "plan GiB | 1st step s | J/img |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['layout']} | {r['ac']} | {r['compile']} | {r['sdpa']} | "
                     f"{r['batch_size']} | {r['status'][:30]} | {num(r.get('img_per_s'), ',.0f')} | "
                     f"{num(r.get('tflops_per_gpu'), '.1f')} | {num(r.get('mfu'), '.3f')} | {num(r.get('peak_mem_gib'), '.1f')} | "
                     f"{num(r.get('predicted_mem_gib'), '.1f')} | {num(r.get('first_step_s'), '.0f')} | "
                     f"{num(r.get('energy_j_per_img'), '.3f')} |")
    sdpa_path = os.path.join(work, "sdpa", "sdpa.json")
    if os.path.exists(sdpa_path):
        lines += ["", "| attention (fwd+bwd ms) | default | flash | efficient | cudnn | math | fastest |",
                  "|---|---|---|---|---|---|---|"]
        with open(sdpa_path) as f:
            for row in json.load(f):
                cells = " | ".join(num(row["ms"].get(k), ".3f") for k in ("default", "flash", "efficient", "cudnn", "math"))
                name = " ".join(part for part in (row["label"], "x".join(map(str, row["shape"]))) if part)
                lines.append(f"| {name} | {cells} | {row['fastest']} |")
    lines += ["", "steps (name, exit code, seconds): " + "; ".join(" ".join(step) for step in steps)]
    text = "\n".join(lines)
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(text + "\n")
    return text


def write_gist(work: str, out: str) -> None:
    """At most four files in `out`: summary.md, results.json (every sweep row, the tests' outcomes, the
    attention timings), logs.txt (the last 60 lines of each step's log), profile.txt (ViT-L's profile)."""
    os.makedirs(out, exist_ok=True)
    if os.path.abspath(out) != os.path.abspath(work):
        shutil.copy(os.path.join(work, "summary.md"), os.path.join(out, "summary.md"))
    steps = read_steps(work)
    results = {"steps": ["\t".join(step) for step in steps], "runs": {}, "tests": {}}
    for name, _, _ in steps:
        path = os.path.join(work, name, "bench.jsonl")  # written row by row: complete even if cut short
        if os.path.exists(path):
            with open(path) as f:
                results["runs"][name] = [json.loads(line) for line in f if line.strip()]
        outcome = junit_counts(work, name)
        if outcome is not None:
            results["tests"][name] = outcome
    sdpa_path = os.path.join(work, "sdpa", "sdpa.json")
    if os.path.exists(sdpa_path):
        with open(sdpa_path) as f:
            results["sdpa"] = json.load(f)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "logs.txt"), "w") as logs:
        for path in sorted(glob.glob(os.path.join(work, "*.log"))):
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
            logs.write(f"===== {os.path.basename(path)} ({len(lines)} lines, last 60) =====\n"
                       + "\n".join(lines[-60:]) + "\n")
    profiles = sorted(glob.glob(os.path.join(work, "vitl_compiled", "profile-*.txt")))
    if profiles:
        shutil.copy(profiles[0], os.path.join(out, "profile.txt"))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def list_step(step: Step) -> None:
    print(f"{step.name:<20} {step.limit_s:>4}s  {' '.join(step.argv)}")


def parse_args(argv=None) -> tuple[Settings, argparse.Namespace]:
    default = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=default.work, help="folder for every log and result")
    parser.add_argument("--out", default=None, help="folder for the gist: summary.md, results.json, logs.txt, "
                                                    "profile.txt (default: --work)")
    parser.add_argument("--budget-s", type=float, default=default.budget_s, help="seconds of measurements in all")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP",
                        help="run only these steps (e.g. what a previous run skipped); --list names them")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every model vit_tiny, 2 timed steps, on the CPU")
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument("--print-env", action="store_true", help=argparse.SUPPRESS)  # the env step's own process
    args = parser.parse_args(argv)
    if args.budget_s < MIN_SLOT_S + RESERVE_S:
        raise ValueError(f"--budget-s must leave room for one step: at least {MIN_SLOT_S + RESERVE_S}, got {args.budget_s:g}")
    # Absolute: the steps run in the repository root, whatever the folder this was started from.
    settings = Settings(work=os.path.abspath(args.work), out=args.out and os.path.abspath(args.out),
                        budget_s=args.budget_s, dry_run=args.cpu_dry_run, only=args.only)
    return settings, args


def main(argv=None) -> int:
    settings, args = parse_args(argv)
    if args.print_env:
        print_environment()
        return 0
    if args.list:
        run_all(dataclasses.replace(settings, only=None), list_step)
        return 0
    run_all(settings, Runner(settings))
    print("\n" + write_summary(settings.work))
    write_gist(settings.work, settings.out or settings.work)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:  # a bad flag: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
