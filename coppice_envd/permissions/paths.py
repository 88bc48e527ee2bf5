"""Path and cwd resolution shared by every envd operation (envd's `ExpandAndResolve`).

The result is a path *inside* the sandbox; it is confined to the root only when a `ConfinedRoot`
opens it, so `..` and symlinks can never leave the sandbox whatever this returns.
"""

from __future__ import annotations

import posixpath

from coppice_jails.runtime.base import User


class PathExpansionError(ValueError):
    """A path that cannot be expanded (`~name`); RPCs report it as invalid_argument, HTTP as 400."""


def expand_and_resolve(path: str, user: User, default_workdir: str | None = None) -> str:
    """Resolve `path` as envd does: `~` is the user's home, relative paths are under the home
    (not the default workdir, which only replaces an empty path), absolute paths stay as given."""
    if not path:
        if default_workdir:
            return default_workdir
        path = ""
    if path.startswith("~"):
        if path != "~" and not path.startswith("~/"):
            raise PathExpansionError("cannot expand user-specific home dir")
        path = user.home + path[1:]
    if posixpath.isabs(path):
        return path  # not cleaned: envd reports absolute paths exactly as given
    return posixpath.normpath(posixpath.join(user.home, path))
