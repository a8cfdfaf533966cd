"""Atomic, durable outputs and the --force guard (moeformer.publish)."""

from __future__ import annotations

import os
import stat

import pytest

from moeformer.publish import MARKER, OutputExistsError, check_replaceable, discard_dir, staged_dir, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_text_replaces_atomically_with_umask_mode(tmp_path):
    target = tmp_path / "a.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind
    assert _mode(target) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_staged_dir_publishes_on_success_and_fixes_safetensors_mode(tmp_path):
    import safetensors.torch
    import torch

    out = tmp_path / "model"
    with staged_dir(out) as tmp:
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        assert not out.exists()
    assert (out / "model.safetensors").exists() and (out / MARKER).exists()
    assert _mode(out / "model.safetensors") == 0o666 & ~_umask()  # safetensors writes 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staged_dir_keeps_the_old_directory_when_the_block_fails(tmp_path):
    out = tmp_path / "model"
    with staged_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(KeyboardInterrupt), staged_dir(out, force=True) as tmp:
        (tmp / "v").write_text("2")
        raise KeyboardInterrupt
    assert (out / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with staged_dir(out, force=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2"


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "checkpoint.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--force"):
        check_replaceable(out, force=False)
    check_replaceable(out, force=True)  # a checkpoint: ours to replace


@pytest.mark.parametrize("kind", ["foreign", "file", "cwd", "parent"])
def test_force_refuses_what_is_not_ours(tmp_path, monkeypatch, kind):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    monkeypatch.chdir(foreign)
    target = {"foreign": foreign, "file": foreign / "thesis.txt", "cwd": ".", "parent": ".."}[kind]
    with pytest.raises(OutputExistsError):
        check_replaceable(target, force=True)
    with pytest.raises(OutputExistsError), staged_dir(target, force=True):
        pass
    assert (foreign / "thesis.txt").read_text() == "years of work"


def test_transformers_directory_is_replaceable(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    check_replaceable(out, force=True)


def _rmtree_killed_after_one_file(path, ignore_errors=False):  # noqa: ARG001
    """What SIGKILL in the middle of shutil.rmtree leaves: some files gone, the rest still there."""
    if not path.exists():
        return
    next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
    raise SystemExit("killed")


def test_a_directory_deleted_half_way_is_never_left_under_its_name(tmp_path, monkeypatch):
    """Found by the 20-SIGKILL test: pruning an old checkpoint was a plain rmtree, so a kill in the
    middle left checkpoints/step-N with its weights gone and its sidecar still there."""
    ckpt = tmp_path / "step-00000004"
    ckpt.mkdir()
    for name in ("checkpoint.json", "model.safetensors", "trainer.pt"):
        (ckpt / name).write_text(name)
    monkeypatch.setattr("moeformer.publish.shutil.rmtree", _rmtree_killed_after_one_file)
    with pytest.raises(SystemExit):
        discard_dir(ckpt)
    assert not ckpt.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".step-00000004.old-{os.getpid()}"]  # removed by the next run
