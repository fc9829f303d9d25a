"""tools/gpu_check.py without a GPU: the step list and each command as built, the choices that depend on
earlier steps' results, the step runner (exit codes, time limit, budget, --only) and the summary's
verdicts on hand-made results. Nothing here depends on how fast the machine is."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

import gpu_check
from gpu_check import Settings, Step


def write_rows(work, name: str, rows: list[dict]) -> None:
    """A sweep's bench.jsonl, as tools/bench.py writes it."""
    os.makedirs(os.path.join(work, name), exist_ok=True)
    with open(os.path.join(work, name, "bench.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def row(model: str, layout: str, status: str, **measured) -> dict:
    return dict(model=model, layout=layout, ac="none", compile="on", sdpa="auto", batch_size=256, status=status,
                **measured)


def write_junit(work, name: str, tests: int, failures: int = 0, skipped: int = 0) -> None:
    """What pytest --junitxml writes, reduced to the counts the summary reads."""
    with open(os.path.join(work, f"{name}.xml"), "w") as f:
        f.write(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" '
                f'failures="{failures}" skipped="{skipped}" tests="{tests}"></testsuite></testsuites>')


def write_steps(work, names: list[str]) -> None:
    with open(os.path.join(work, "steps.tsv"), "w") as f:
        f.writelines(f"{name}\t0\t10\n" for name in names)


# ---- the steps and their commands (nothing is run) ----


class FakeRun:
    """Stands in for Runner: records each step; `results` maps a step name to the rows its sweep leaves."""

    def __init__(self, work, results: dict[str, list[dict]] | None = None):
        self.work, self.results, self.steps = work, results or {}, []

    def __call__(self, step: Step) -> int:
        self.steps.append(step)
        if step.name in self.results:
            write_rows(self.work, step.name, self.results[step.name])
        return 0


def test_steps_in_order_with_their_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "largest_candidates", lambda s: ["vit_3b", "vit_1b"])
    settings = Settings(work=str(tmp_path))
    run = FakeRun(tmp_path, {"largest_vit_3b": [row("vit_3b", "full_shard", "oom")],
                             "largest_vit_1b": [row("vit_1b", "full_shard", "ok")]})
    gpu_check.run_all(settings, run)
    # Targets first, then the largest models (the search stops at the first that trains), the GPU tests,
    # the extras; no sdpa.json was written, so no attention-kernel rerun.
    assert [step.name for step in run.steps] == [
        "env", "smoke", "vitl_compiled", "vith_compiled", "vit1b_compiled", "vit3b_compiled",
        "largest_vit_3b", "largest_vit_1b", "largest_offload", "offload_resume", "stop_flag",
        "vitl_eager", "sdpa", "vitl_compiled_ac", "vitl_compiled_ddp"]
    steps = {step.name: step for step in run.steps}
    bench_py = os.path.join(gpu_check.ROOT, "tools", "bench.py")
    assert steps["vitl_compiled"].argv == [
        sys.executable, bench_py, "sweep", "--out", str(tmp_path / "vitl_compiled"), "--mem-cap-gib", "79.1",
        "--steps", "10", "--warmup", "2", "--models", "vit_large", "--batch-sizes", "256", "--ac", "none",
        "--compile", "on", "--profile"]
    # Its own, shorter --steps/--warmup come after the defaults: argparse keeps the last.
    assert steps["largest_offload"].argv[11:] == [
        "--models", "vit_5b", "--batch-sizes", "32", "--ac", "full", "--strategies", "full_shard", "--compile", "off",
        "--cpu-offload", "--steps", "2", "--warmup", "1"]
    assert steps["smoke"].argv[1:4] == ["-m", "pytest", os.path.join(gpu_check.ROOT, "tests", "test_gpu.py")]
    assert steps["smoke"].argv[-1] == f"--junitxml={tmp_path / 'smoke.xml'}"
    assert steps["stop_flag"].argv[steps["stop_flag"].argv.index("-k") + 1] == "stop_flag"
    assert sum(step.limit_s for step in run.steps) <= 2000  # each slot is bounded; the budget cuts the total


def test_largest_search_stops_at_the_first_model_that_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "largest_candidates", lambda s: ["vit_3b", "vit_1b"])
    run = FakeRun(tmp_path, {"largest_vit_3b": [row("vit_3b", "full_shard", "ok")]})
    gpu_check.run_all(Settings(work=str(tmp_path)), run)
    names = [step.name for step in run.steps]
    assert "largest_vit_3b" in names and "largest_vit_1b" not in names


@pytest.mark.parametrize("cudnn_ms, rerun", [(0.5, True), (0.98, False)])
def test_attention_kernel_rerun_only_when_it_beats_the_default(tmp_path, monkeypatch, cudnn_ms, rerun):
    monkeypatch.setattr(gpu_check, "largest_candidates", lambda s: [])
    # ViT-L's attention: default 1.0 ms per call; cuDNN 5% or more faster makes the rerun, else none.
    timings = [dict(label=f"vit_large {part}", shape=[1, 1, 1, 1], fastest="cudnn",
                    ms=dict(default=1.0, flash=1.2, efficient=1.5, cudnn=cudnn_ms, math=9.0))
               for part in ("encoder", "decoder")]

    def run(step: Step) -> int:
        if step.name == "sdpa":
            os.makedirs(tmp_path / "sdpa")
            (tmp_path / "sdpa" / "sdpa.json").write_text(json.dumps(timings))
        run.steps.append(step)
        return 0

    run.steps = []
    gpu_check.run_all(Settings(work=str(tmp_path)), run)
    steps = {step.name: step for step in run.steps}
    assert ("vitl_compiled_sdpa" in steps) == rerun
    if rerun:
        assert steps["vitl_compiled_sdpa"].argv[-2:] == ["--sdpa", "cudnn"]


def test_dry_run_commands_use_vit_tiny_on_the_cpu(tmp_path):
    run = FakeRun(tmp_path)
    gpu_check.run_all(Settings(work=str(tmp_path), dry_run=True), run)
    sweeps = [step for step in run.steps if "sweep" in step.argv]
    models = {step.argv[step.argv.index("--models") + 1] for step in sweeps}
    assert models == {"vit_tiny"}
    assert all(step.argv[step.argv.index("--compile") + 1] == "off" for step in sweeps)
    assert "vitl_compiled_sdpa" in [step.name for step in run.steps]  # the switch is exercised
    assert gpu_check.Runner(Settings(work=str(tmp_path), dry_run=True)).env["CUDA_VISIBLE_DEVICES"] == ""


def test_largest_candidates_from_the_planner():
    # Full_shard on one GPU, ac full, batch 32: the encoder's fp32 params, grads and AdamW state take
    # 16 bytes/param; vit_5b's (5.33e9 params: 79.5 GiB) exceed the 79.1 GiB cap, ViT-e's (3.80e9: 56.7 GiB)
    # and vit_3b's (3.05e9: 45.4 GiB) do not. The two largest that fit are the candidates, largest first.
    assert gpu_check.largest_candidates(Settings()) == ["vit_e", "vit_3b"]


def test_list_prints_every_step_and_runs_nothing(tmp_path, capsys):
    assert gpu_check.main(["--list", "--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "vitl_compiled" in out and "tools/bench.py sweep" in out and "test_gpu.py" in out
    assert not (tmp_path / "work").exists()


def test_rejects_a_budget_too_small_for_one_step():
    with pytest.raises(ValueError, match="--budget-s must leave room for one step"):
        gpu_check.main(["--budget-s", "5"])


# ---- the step runner ----


class FixedClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_runner_records_exit_codes_logs_and_skips(tmp_path):
    clock = FixedClock()
    settings = Settings(work=str(tmp_path), budget_s=100)
    runner = gpu_check.Runner(settings, clock=clock)
    py = sys.executable
    assert runner(Step("ok", 30, [py, "-c", "print('hello from a step')"])) == 0
    assert runner(Step("fails", 30, [py, "-c", "import sys; sys.exit(3)"])) == 3
    assert runner(Step("env_passed", 30, [py, "-c", "import os, sys; sys.exit(os.environ['X'] != 'y')"],
                       env={"X": "y"})) == 0
    clock.now = 100 - gpu_check.RESERVE_S - gpu_check.MIN_SLOT_S + 1  # less than one slot left of the budget
    assert runner(Step("late", 30, [py, "-c", "raise SystemExit(5)"])) is None
    assert (tmp_path / "ok.log").read_text() == "hello from a step\n"
    assert [line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines()] == [
        ["ok", "0"], ["fails", "3"], ["env_passed", "0"], ["late", "skipped"]]
    assert not (tmp_path / "late.log").exists()


def test_runner_runs_only_the_chosen_steps(tmp_path):
    runner = gpu_check.Runner(Settings(work=str(tmp_path), only=["second"]), clock=FixedClock())
    assert runner(Step("first", 30, [sys.executable, "-c", "pass"])) is None
    assert runner(Step("second", 30, [sys.executable, "-c", "pass"])) == 0
    assert (tmp_path / "steps.tsv").read_text().splitlines() == ["second\t0\t0"]


def test_a_step_past_its_time_limit_is_ended_with_its_children(tmp_path):
    # The child starts a grandchild in the same process group; both must be gone after the limit.
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print(p.pid, flush=True); time.sleep(600)")
    # The limit only has to outlast the child's start (printing the pid: well under a second); the kill is tested.
    assert gpu_check.run_process([sys.executable, "-c", code], {}, 5, str(tmp_path / "slow.log")) == 124
    grandchild = int((tmp_path / "slow.log").read_text().split()[0])
    for _ in range(600):  # the signal is delivered at once; the exit itself may take the scheduler a moment
        if not alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child process outlived the time limit")


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (ended, not yet reaped by its new parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_dry_run_of_the_cheap_steps_without_time_limits(tmp_path):
    # The machine report and the attention timing really run (vit_tiny shapes, on the CPU), then the summary
    # and the gist: the plumbing between the steps and the summary, with no time limit on a busy machine.
    settings = Settings(work=str(tmp_path / "work"), dry_run=True, only=["env", "sdpa"])
    gpu_check.run_all(settings, gpu_check.Runner(settings, time_limits=False))
    assert "no GPU: CPU" in (tmp_path / "work" / "env.log").read_text()
    summary = gpu_check.write_summary(settings.work)
    assert summary.startswith("## gpu_check: torch ") and "| attention (fwd+bwd ms) |" in summary
    assert "| 4x4x17x16 |" in summary
    gpu_check.write_gist(settings.work, str(tmp_path / "out"))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [step.split("\t")[:2] for step in results["steps"]] == [["env", "0"], ["sdpa", "0"]]
    assert results["sdpa"][0]["shape"] == [4, 4, 17, 16]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"summary.md", "results.json", "logs.txt"}


# ---- the summary's verdicts on hand-made results ----


def test_targets_met_and_missed(tmp_path):
    write_rows(tmp_path, "vitl_compiled", [row("vit_large", "no_shard", "ok", img_per_s=3300.0, mfu=0.42,
                                                 peak_mem_gib=40.0, loss=0.9)])
    write_rows(tmp_path, "vith_compiled", [row("vit_huge", "no_shard", "ok", img_per_s=900.0, mfu=0.44,
                                                 peak_mem_gib=60.0, loss=0.9)])
    write_rows(tmp_path, "vit3b_compiled", [row("vit_3b", "no_shard", "oom")])
    write_steps(tmp_path, ["vitl_compiled", "vith_compiled", "vit3b_compiled"])
    lines = gpu_check.write_summary(str(tmp_path)).splitlines()
    line = lambda start: next(x for x in lines if x.startswith(start))  # noqa: E731
    assert line("| ViT-L/16 b256 compiled").endswith("| >= 3,200 img/s, MFU >= 0.4 | yes |")
    assert "3,300 img/s, MFU 0.420" in line("| ViT-L/16 b256 compiled")
    assert line("| ViT-H/14 b256 compiled").endswith("| MFU >= 0.45 | NO |")  # 0.44 < 0.45
    assert line("| ViT-3B/14") == "| ViT-3B/14 b64 compiled, one GPU | oom | | no |"
    assert line("| ViT-1B/14") == "| ViT-1B/14 b256 compiled | no result (not run; see vit1b_compiled.log) | | no |"
    assert (tmp_path / "summary.md").read_text() == "\n".join(lines) + "\n"


def test_offloaded_model_is_not_reported_as_the_largest_without_offload(tmp_path):
    """The CPU-offload run is named largest_offload; it must not count as the largest model that trains
    on one GPU *without* offload, the target the largest_<candidate> runs measure."""
    ok = dict(img_per_s=12.0, tflops_per_gpu=1.0, mfu=0.1, peak_mem_gib=20.0, host_peak_gib=86.0, loss=1.0)
    write_rows(tmp_path, "largest_vit_3b", [row("vit_3b", "full_shard", "oom")])
    write_rows(tmp_path, "largest_vit_1b", [row("vit_1b", "full_shard", "oom")])
    write_rows(tmp_path, "largest_offload", [row("vit_5b", "full_shard+offload", "ok", **ok)])
    write_steps(tmp_path, ["largest_vit_3b", "largest_vit_1b", "largest_offload"])
    summary = gpu_check.write_summary(str(tmp_path))
    largest = next(line for line in summary.splitlines() if line.startswith("| largest on one 80 GB GPU"))
    assert "| none (tried: vit_3b oom, vit_1b oom) |" in largest, largest
    offload = next(line for line in summary.splitlines() if line.startswith("| vit_5b on one GPU with CPU offload"))
    assert "vit_5b trains" in offload and "host peak 86 GiB" in offload, offload


def test_gpu_test_outcomes_in_the_summary(tmp_path):
    write_junit(tmp_path, "smoke", tests=12, failures=1)
    write_junit(tmp_path, "stop_flag", tests=1)
    write_junit(tmp_path, "offload_resume", tests=1, skipped=1)
    write_steps(tmp_path, ["smoke", "offload_resume", "stop_flag"])
    lines = gpu_check.write_summary(str(tmp_path)).splitlines()
    line = lambda start: next(x for x in lines if x.startswith(start))  # noqa: E731
    assert line("| fsdp_setup smoke").endswith("| 11/12 pass | all pass | NO |")
    assert line("| train.py's stop flag").endswith("| 1/1 pass | all pass | yes |")
    assert line("| --cpu-offload via train.py").endswith("| 0/1 pass, 1 skipped (no GPU) | all pass | NO |")
    gpu_check.write_gist(str(tmp_path), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tests"]["smoke"] == dict(
        total=12, failed=1, skipped=0, passed=11)
