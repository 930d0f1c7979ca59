"""Outputs never harm what their path names: devices, FIFOs, folders and symlinks are refused before
any work, modes are kept, writes are atomic even when the writer is killed, bundles swap in whole."""
import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tinytrain as tt
from tinytrain.cli import main
from tinytrain.errors import OutputPathError
from tinytrain.outputs import check_file, write_atomic, write_folder_atomic


def test_a_fifo_a_folder_and_a_symlink_are_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="a FIFO, not a regular file"):
        write_atomic(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(OutputPathError, match="a folder, not a regular file"):
        write_atomic(folder, b"x")
    assert folder.is_dir()

    target = tmp_path / "target.txt"
    target.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OutputPathError, match="is a symlink"):
        write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"keep"


def test_the_null_device_is_refused_before_anything_happens():
    with pytest.raises(OutputPathError, match="a character device"):
        check_file(os.devnull)
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_a_missing_folder_is_refused_not_created(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        write_atomic(tmp_path / "missing" / "deeper" / "out.json", b"{}")
    assert not (tmp_path / "missing").exists()


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        os.chmod(kept, 0o644)
        write_atomic(kept, b"new")
        assert kept.read_bytes() == b"new" and stat.S_IMODE(os.stat(kept).st_mode) == 0o644
        os.umask(0o022)
        fresh = tmp_path / "fresh.bin"
        write_atomic(fresh, b"new")
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644
    finally:
        os.umask(old)


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    from tinytrain import outputs
    def stalled_replace(src, dst):
        print("between write and rename", flush=True)
        time.sleep(60)
    outputs.os.replace = stalled_replace
    outputs.write_atomic(sys.argv[1], b"new" * 1000)
""")


def test_a_writer_killed_between_write_and_rename_leaves_the_old_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "between write and rename"
        temps = [n for n in os.listdir(tmp_path) if n.startswith(".tinytrain-")]
        assert len(temps) == 1 and os.path.getsize(tmp_path / temps[0]) == 3000  # fully written, not renamed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert path.read_bytes() == b"old"
    # The next write into that folder removes what the dead writer left.
    write_atomic(tmp_path / "other.json", b"{}")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "other.json"]


def test_a_bundle_swaps_in_whole_and_refuses_a_folder_of_the_users(tmp_path):
    out = tmp_path / "bundle"
    write_folder_atomic(out, {"a.bin": b"1", "b.bin": b"2"})
    write_folder_atomic(out, {"a.bin": b"3", "b.bin": b"4"})
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == {"a.bin": b"3", "b.bin": b"4"}
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"holds files that are not the bundle's \(notes.txt\)"):
        write_folder_atomic(out, {"a.bin": b"5", "b.bin": b"6"})
    assert (out / "a.bin").read_bytes() == b"3" and (out / "notes.txt").read_text() == "mine"


def test_the_cli_refuses_a_bad_output_before_training(tmp_path, monkeypatch, capsys):
    def must_not_train(*args, **kwargs):
        raise AssertionError("trained before checking the output path")

    monkeypatch.setattr(tt.Trainer, "fit", must_not_train)
    x, y = tt.datasets.digits("target", "train")
    np.savez(tmp_path / "d.npz", X=x[:8], Y=y[:8])
    model = str(tmp_path / "demo.onnx")
    with open(model, "wb") as f:
        f.write(tt.models.demo().SerializeToString())
    code = main(["train", model, "--data", str(tmp_path / "d.npz"), "--scheme", "last:1",
                 "-o", str(tmp_path / "no-such-folder" / "trained.onnx")])
    assert code == 1
    assert "folder" in capsys.readouterr().err and not (tmp_path / "no-such-folder").exists()
