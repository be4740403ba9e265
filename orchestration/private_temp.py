"""Local scratch files that other users of the machine can neither read, replace nor redirect.

A predictable name in the shared temp dir (``/tmp/logs/...``, ``/tmp/vilau-lm-tokenizer-<hash>``) lets
another local user create it first: a symlink that turns our writes into writes of their choosing, or a
folder of their content that we would then trust. Here every scratch path lives under
``<tmp>/vilau-<uid>``, a folder of this user's own with mode 0700 (refused if it is anything else),
and files are opened without following symlinks.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def user_temp_root() -> Path:
    """``<tmp>/vilau-<uid>``, created 0700; refused when it is a symlink, another user's, or open to others."""
    root = Path(tempfile.gettempdir()) / f"vilau-{os.getuid()}"
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"{root} is not a private folder of this user (a symlink, another user's folder, or open to "
            "others); remove it and run again"
        )
    return root


def private_run_dir(prefix: str) -> Path:
    """A new folder (0700, unique name) for one run's scratch files, under this user's temp root."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=user_temp_root()))


def open_private_append(path: str | os.PathLike):
    """``open(path, "a")`` readable by this user only (created 0600) that refuses a symlink at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "a", buffering=1)
