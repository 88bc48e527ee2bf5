"""What a template is: its metadata, its errors, and the defaults every template shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from coppice_jails.envd_facts import DEFAULT_PATH

# Progress lines of a long operation (build, import), for whoever started it to show.
Progress = Callable[[str], None]

ALIASES: Mapping[str, str] = {"default": "base"}
DEFAULT_USER = "user"
DEFAULT_ENV: Mapping[str, str] = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}


def quiet(line: str) -> None:
    """Progress that goes nowhere."""


class TemplateError(Exception):
    pass


class UnknownTemplate(TemplateError, LookupError):
    pass


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    backend: str
    created: str  # ISO 8601, UTC
    size_bytes: int
    user: str
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    origin: str = "build"  # build | import | snapshot
    parent: str | None = None
    recipe: str | None = None  # Recipe.digest() of a built template

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TemplateInfo:
        return cls(**json.loads(text))
