"""checkpoint.py on its own: the order in which a resume tries folders, the rename-point-prune
order of a save, the export command's errors. Damaged and hostile checkpoints are in
test_checkpoint_faults.py. Whole saves, resumes, crashes during a save and the export of a real
run are in test_train.py (they need a training run).
"""

from __future__ import annotations

import os

import pytest

import checkpoint


def latest(out):
    return (out / "latest").read_text().strip()


def test_candidates_put_latest_first_then_newest_first(tmp_path):
    """Only which folders are tried, in which order; whether each verifies is in test_checkpoint_faults.py."""
    assert checkpoint.checkpoint_candidates(tmp_path) == ([], [])
    for name in ("step-5", "step-20", "step-100", ".tmp-step-400", "step-7.bak", "damaged-step-300"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-200").write_text("")  # a file, not a folder
    names = lambda: [p.name for p in checkpoint.checkpoint_candidates(tmp_path)[0]]
    assert names() == ["step-100", "step-20", "step-5"]  # numerically, not as text
    (tmp_path / "latest").write_text("step-5\n")
    assert names() == ["step-5", "step-100", "step-20"] and checkpoint.checkpoint_candidates(tmp_path)[1] == []
    for pointer in ("step-30", "../step-5", "step-5/../step-20", str(tmp_path / "step-20"), ".tmp-step-400"):
        (tmp_path / "latest").write_text(pointer + "\n")
        folders, notes = checkpoint.checkpoint_candidates(tmp_path)
        assert [p.name for p in folders] == ["step-100", "step-20", "step-5"]
        assert notes == [f"ignoring {tmp_path / 'latest'}: {pointer!r} is not a step-N folder of {tmp_path}"]


def test_publish_renames_then_points_then_prunes(tmp_path):
    for name in ("step-2", "step-4", "step-9", ".tmp-step-5", ".tmp-step-6"):
        (tmp_path / name).mkdir()
    (tmp_path / "latest").write_text("step-4\n")
    checkpoint.publish_checkpoint(tmp_path, tmp_path / ".tmp-step-6", tmp_path / "step-6", keep=2)
    assert latest(tmp_path) == "step-6"
    # step-2 is beyond --keep 2, the .tmp-* are interrupted saves. step-9, newer and never named by
    # `latest`, would be removed if it verified (a complete save of an abandoned branch); an empty
    # folder does not, so it is kept under another name.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged-step-9", "latest", "step-4", "step-6"]


def test_export_command_errors_are_one_line(tmp_path, capsys):
    assert checkpoint.cli(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "encoder.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt") and "neither a step-N checkpoint folder" in err and "Traceback" not in err
    assert not (tmp_path / "encoder.pt").exists()
    assert checkpoint.cli([]) == 2 and "usage: python checkpoint.py export" in capsys.readouterr().err
    assert checkpoint.cli(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "no" / "enc.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'no' / 'enc.pt'}: no folder")


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
