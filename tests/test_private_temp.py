"""Scratch files on the local disk that other users of the machine cannot read, replace or redirect:
the console log of a job whose outputs are on S3 (or on a cluster), and the local copy of the LM
tokenizer. Both used to live at predictable names in the shared temp dir (/tmp/logs/...,
/tmp/vilau-lm-tokenizer-<hash>) and were opened or trusted by name."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from orchestration.config import load_config


@pytest.fixture()
def shared_tmp(tmp_path, monkeypatch) -> Path:
    """A stand-in for /tmp: the temp dir every user of the machine shares."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir(mode=0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_console_log_of_an_s3_run_is_in_a_private_folder_of_its_own(shared_tmp, tmp_path, monkeypatch):
    from orchestration.console import JobConsole

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config(None, ["output_dir=s3://bucket/run/outputs", "cluster.storage_path=s3://bucket/run/ray",
                                f"data.root={tmp_path}/data", "tracking.enabled=false"])
    first, second = JobConsole(config, "pretrain"), JobConsole(config, "pretrain")
    for console in (first, second):
        folder = Path(console.log_path).parent
        assert folder.parent == shared_tmp / f"vilau-{os.getuid()}"  # this user's root, not <tmp>/logs
        assert _mode(folder) == 0o700 and _mode(folder.parent) == 0o700
    assert Path(first.log_path).parent != Path(second.log_path).parent  # one folder per run
    assert not (shared_tmp / "logs").exists()


def test_a_planted_user_root_or_log_symlink_is_refused(shared_tmp, tmp_path):
    from orchestration.private_temp import open_private_append, user_temp_root

    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    (shared_tmp / f"vilau-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="not a private folder"):
        user_temp_root()
    (shared_tmp / f"vilau-{os.getuid()}").unlink()
    (shared_tmp / f"vilau-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(shared_tmp / f"vilau-{os.getuid()}", 0o755)  # open to others (as made by an old umask)
    with pytest.raises(PermissionError, match="open to others"):
        user_temp_root()

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "run.log"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        open_private_append(link)
    assert victim.read_text() == "keep me\n"
    with open_private_append(tmp_path / "fresh.log") as log:
        log.write("line\n")
    assert _mode(tmp_path / "fresh.log") == 0o600


def _tokenizer_folder(where: Path, text: str) -> Path:
    where.mkdir(parents=True)
    (where / "tokenizer.json").write_text(text)
    (where / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return where


def test_tokenizer_copy_is_private_and_checked_before_reuse(shared_tmp, tmp_path):
    from orchestration.data.lm_data import _content_addressed_copy, directory_files, files_sha256

    original = '{"model": "the real one"}'
    first = Path(_content_addressed_copy(_tokenizer_folder(tmp_path / "a" / "lm_tokenizer", original)))
    assert first.parent == shared_tmp / f"vilau-{os.getuid()}" and _mode(first.parent) == 0o700
    digest = files_sha256(directory_files(str(first)))
    assert first.name == f"lm-tokenizer-{digest[:32]}"

    # Same content again: the one copy is reused.
    again = Path(_content_addressed_copy(_tokenizer_folder(tmp_path / "b" / "lm_tokenizer", original)))
    assert again == first

    # A copy whose files no longer match its name is not trusted: it is replaced by the real content.
    (first / "tokenizer.json").write_text('{"model": "swapped"}')
    third = Path(_content_addressed_copy(_tokenizer_folder(tmp_path / "c" / "lm_tokenizer", original)))
    assert third == first
    assert (third / "tokenizer.json").read_text() == original
    assert files_sha256(directory_files(str(third))) == digest
