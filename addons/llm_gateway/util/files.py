"""File stamps: whether a watched file (the rule file, a key file) changed since it was last read."""

from __future__ import annotations

import os


def file_stamp(path: str) -> tuple | None:
    """What changes when the file is edited, replaced, or (ConfigMap style) re-pointed by a symlink swap."""
    try:
        st = os.stat(path)  # follows symlinks, so a swapped target has a new inode
        return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None
