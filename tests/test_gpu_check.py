"""gpu_check.sh's summary step, run on hand-made results (the script itself needs a GPU for its numbers).

The summary is the Python heredoc after `# ---- summary, last ----`; it is taken from the script as is,
so this tests the code that runs on the GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summary_program() -> str:
    lines = (ROOT / "gpu_check.sh").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- summary, last"))
    start = next(i for i in range(start, len(lines)) if lines[i].endswith("<<'EOF'")) + 1
    end = next(i for i in range(start, len(lines)) if lines[i] == "EOF")
    return "\n".join(lines[start:end]) + "\n"


def run_summary(work: Path, runs: dict[str, list[dict]]) -> str:
    """Write steps.tsv and each run's bench.jsonl as gpu_check.sh's sweeps would, run the summary."""
    with open(work / "steps.tsv", "w") as f:
        for name, rows in runs.items():
            f.write(f"{name}\t0\t10\n")
            os.makedirs(work / name, exist_ok=True)
            with open(work / name / "bench.jsonl", "w") as jsonl:
                jsonl.writelines(json.dumps(row) + "\n" for row in rows)
    result = subprocess.run([sys.executable, "-", str(work)], input=summary_program(), text=True,
                            capture_output=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return (work / "summary.md").read_text()


def row(run_model: str, layout: str, status: str, **extra) -> dict:
    return dict(model=run_model, layout=layout, ac="full", compile="off", sdpa="auto", batch_size=32, status=status,
                **extra)


def test_offloaded_model_is_not_reported_as_the_largest_without_offload(tmp_path):
    """The CPU-offload run is named largest_offload; it must not count as the largest model that trains
    on one GPU *without* offload, the target the largest_<candidate> runs measure."""
    ok = dict(img_per_s=12.0, tflops_per_gpu=1.0, mfu=0.1, peak_mem_gib=20.0, host_peak_gib=86.0, loss=1.0)
    summary = run_summary(tmp_path, {
        "largest_vit_3b": [row("vit_3b", "full_shard", "oom")],
        "largest_vit_1b": [row("vit_1b", "full_shard", "oom")],
        "largest_offload": [row("vit_5b", "full_shard+offload", "ok", **ok)],
    })
    largest = next(line for line in summary.splitlines() if line.startswith("| largest on one 80 GB GPU"))
    assert "| none (tried: vit_3b oom, vit_1b oom) |" in largest, largest
    offload = next(line for line in summary.splitlines() if line.startswith("| vit_5b on one GPU with CPU offload"))
    assert "vit_5b trains" in offload and "host peak 86 GiB" in offload, offload


def test_cpu_dry_run_of_the_whole_script(tmp_path):
    """Every step of the prepared GPU script runs (vit_tiny, 2 steps, on the CPU), so a renamed function
    or flag breaks here and not in the next session's few minutes of GPU time."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "gpu_check.sh"), "--cpu-dry-run"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "work" / "steps.tsv").read_text().splitlines()]
    failed = [(name, code) for name, code, _ in steps if code != "0"]
    assert not failed, (failed, result.stdout[-3000:])
    names = {name for name, _, _ in steps}
    assert {"env", "smoke", "vitl_compiled", "largest_offload", "offload_resume", "stop_flag", "sdpa"} <= names, names
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| fsdp_setup smoke vs a plain model | 12/12 pass | all | yes |" in summary, summary
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"summary.md", "results.json", "logs.txt"}
