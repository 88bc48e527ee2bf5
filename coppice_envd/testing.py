"""Stand-in sandboxes for gateway tests and benchmarks: temp trees with their own accounts, on
fake jails (coppice_jails.testing), and a fixed lookup of them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from coppice_envd.sandboxes import SandboxLookup, SandboxView
from coppice_jails.testing import FakeJail

USER_UID = 1000

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
user:x:1000:1000::/home/user:/bin/bash
"""
GROUP = """root:x:0:
daemon:x:1:
sudo:x:27:user
user:x:1000:
"""


def make_root(root: Path, *, shadow: str = "sandbox-shadow\n") -> Path:
    """A minimal sandbox tree: /etc/{passwd,group,shadow}, /root, /tmp, /home/user (uid 1000)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/shadow").write_text(shadow)
    (root / "root").mkdir(mode=0o700)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    home = root / "home/user"
    home.mkdir(parents=True)
    os.chown(home, USER_UID, USER_UID)
    return root


def make_sandbox(
    root: Path,
    sandbox_id: str | None = None,
    *,
    access_token: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> SandboxView:
    make_root(root)
    sandbox_id = sandbox_id or root.name
    return SandboxView(
        sandbox_id=sandbox_id,
        jail=FakeJail(sandbox_id, root),
        access_token=access_token,
        env_vars=env_vars or {},
    )


@dataclass
class StaticLookup(SandboxLookup):
    """A fixed list of live sandboxes in start order; the last one is the most recent."""

    sandboxes: list[SandboxView] = field(default_factory=list)

    def get(self, sandbox_id: str) -> SandboxView | None:
        return next((s for s in self.sandboxes if s.sandbox_id == sandbox_id), None)

    def most_recent(self) -> SandboxView | None:
        return self.sandboxes[-1] if self.sandboxes else None
