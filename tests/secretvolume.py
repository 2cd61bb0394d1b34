"""A Kubernetes Secret volume as the kubelet writes it, for tests of key files that change.

The kubelet never rewrites a key file in place: it writes the new version into a fresh folder
`..<timestamp>`, re-points the `..data` symlink at it atomically, and each key is a symlink `key -> ..data/key`.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(folder: Path, key: str, value: str) -> Path:
    """Publish a new version of the Secret holding `key: value` in `folder`; returns the key's path."""
    folder.mkdir(parents=True, exist_ok=True)
    version = folder / f"..v{len(list(folder.glob('..v*'))) + 1:04d}"
    version.mkdir()
    (version / key).write_text(value)
    link = folder / "..data_tmp"
    os.symlink(version.name, link)
    os.replace(link, folder / "..data")
    path = folder / key
    if not path.is_symlink():
        os.symlink(f"..data/{key}", path)
    return path
