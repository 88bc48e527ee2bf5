"""Safety checks of a root filesystem tarball before it is unpacked."""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import Path

from coppice_jails.templates.model import TemplateError


def _member_path(name: str) -> str:
    """A tar member's path relative to the target, or TemplateError if it could escape."""
    if name.startswith("/") or ".." in name.split("/"):
        raise TemplateError(f"unsafe tar member {name!r}: absolute or contains '..'")
    normal = posixpath.normpath(name)
    return "" if normal == "." else normal


def check_tar_members(tar_path: Path) -> int:
    """Refuse a tarball any of whose entries could land outside the target; return the count.

    Symlinks may point anywhere (they are resolved inside the jail later), but no entry may be
    written through one, and hard links must stay inside.
    """
    symlinks: set[str] = set()
    paths: list[str] = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                path = _member_path(member.name)
                paths.append(path)
                if member.issym():
                    symlinks.add(path)
                elif member.islnk():
                    paths.append(_member_path(member.linkname))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TemplateError(f"cannot read {tar_path} as a tarball: {e}") from e
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in symlinks:
                raise TemplateError(
                    f"unsafe tar member {path!r}: it goes through the symlink "
                    f"{'/'.join(parts[:i])!r}"
                )
    if not paths:
        raise TemplateError(f"{tar_path} is an empty tarball")
    return len(paths)
