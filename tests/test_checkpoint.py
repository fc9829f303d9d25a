"""checkpoint.py on its own: which folder a resume picks, the rename-point-prune order of a save,
the export command's errors. Whole saves, resumes, crashes during a save and the export of a real
run are in test_train.py (they need a training run).
"""

from __future__ import annotations

import checkpoint


def latest(out):
    return (out / "latest").read_text().strip()


def test_find_checkpoint_skips_incomplete_folders(tmp_path):
    def make(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / ".metadata").write_text("")
            (tmp_path / name / "train_state.json").write_text("{}")

    assert checkpoint.find_checkpoint(tmp_path) is None
    make("step-5"), make("step-20"), make("step-30", complete=False), make(".tmp-step-40")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-20"  # newest complete, no pointer
    (tmp_path / "latest").write_text("step-5\n")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-5"  # the pointer wins
    (tmp_path / "latest").write_text("step-30\n")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-20"  # pointer to a broken folder: ignored


def test_publish_renames_then_points_then_prunes(tmp_path):
    for name in ("step-2", "step-4", "step-9", ".tmp-step-5", ".tmp-step-6"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step-4\n")
    checkpoint.publish_checkpoint(tmp_path, tmp_path / ".tmp-step-6", tmp_path / "step-6", keep=2)
    assert latest(tmp_path) == "step-6"
    # step-9 was never named by `latest` (killed right after its rename): an abandoned branch.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-4", "step-6"]


def test_export_command_errors_are_one_line(tmp_path, capsys):
    assert checkpoint.cli(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "encoder.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt") and "neither a complete step-N" in err and "Traceback" not in err
    assert not (tmp_path / "encoder.pt").exists()
    assert checkpoint.cli([]) == 2 and "usage: python checkpoint.py export" in capsys.readouterr().err
