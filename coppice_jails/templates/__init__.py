"""Templates: a root filesystem in a Storage plus metadata (default user, workdir, env).

model (TemplateInfo, errors, aliases), store (TemplateStore: metadata, locks, import,
snapshots), builder (recipes and the build steps), tarball (import safety checks), run (the
external commands of both). Progress goes to a callback; nothing here prints.
"""

from coppice_jails.templates.builder import NPM, RECIPES, NpmRelease, Recipe, debian_mirror
from coppice_jails.templates.model import (
    ALIASES,
    Progress,
    TemplateError,
    TemplateInfo,
    UnknownTemplate,
)
from coppice_jails.templates.store import TemplateStore

__all__ = [
    "ALIASES",
    "NPM",
    "RECIPES",
    "NpmRelease",
    "Progress",
    "Recipe",
    "TemplateError",
    "TemplateInfo",
    "TemplateStore",
    "UnknownTemplate",
    "debian_mirror",
]
