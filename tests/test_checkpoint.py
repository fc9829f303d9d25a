"""checkpoint.py on its own: which folder a resume picks, the rename-point-prune order of a save,
the export command's errors. Whole saves, resumes, crashes during a save and the export of a real
run are in test_train.py (they need a training run).
"""

from __future__ import annotations

import os

import pytest

import checkpoint


def latest(out):
    return (out / "latest").read_text().strip()


def test_find_checkpoint_skips_incomplete_folders(tmp_path):
    def make(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / ".metadata").write_text("")
            (tmp_path / name / "train_state.json").write_text('{"world_size": 2}')
            for rank in range(2):
                (tmp_path / name / f"rank-{rank:05d}.json").write_text("{}")

    assert checkpoint.find_checkpoint(tmp_path) is None
    make("step-5"), make("step-20"), make("step-30", complete=False), make(".tmp-step-40")
    make("step-25"), (tmp_path / "step-25" / "rank-00001.json").unlink()  # a rank's file lost: incomplete too
    make("step-28"), (tmp_path / "step-28" / "train_state.json").write_text('{"world_')  # unreadable
    assert checkpoint.missing_files(tmp_path / "step-25") == ["rank-00001.json"]
    assert checkpoint.find_checkpoint(tmp_path).name == "step-20"  # newest complete, no pointer
    (tmp_path / "latest").write_text("step-5\n")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-5"  # the pointer wins
    (tmp_path / "latest").write_text("step-30\n")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-20"  # pointer to a broken folder: ignored
    (tmp_path / "latest").write_text("step-25\n")
    assert checkpoint.find_checkpoint(tmp_path).name == "step-20"


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


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced descriptors through Linux's /proc")
def test_renames_are_made_durable_by_fsyncing_the_folder(tmp_path, monkeypatch):
    """A rename lives in its directory: until that is fsynced a power loss can undo it (and `latest`)."""
    events, real_fsync, real_replace = [], checkpoint.os.fsync, checkpoint.os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", str(dst)))

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    (tmp_path / ".tmp-step-6").mkdir()
    checkpoint.publish_checkpoint(tmp_path, tmp_path / ".tmp-step-6", tmp_path / "step-6", keep=2)
    folder = str(tmp_path)
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert [events[i][1] for i in renames] == [str(tmp_path / "step-6"), str(tmp_path / "latest")]
    # After each rename and before the next one, the folder holding it is fsynced.
    for start, end in zip(renames, [*renames[1:], len(events)]):
        assert ("fsync", folder) in events[start + 1:end], events
