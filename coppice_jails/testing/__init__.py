"""Test doubles and real test backends for the jail layer, shipped once for every suite and bench.

- fakes: in-memory `FakeStorage` and `FakeRuntime` (each can be told to fail at one step, leaving
  a half-made leftover the way a real backend would), `FakeJail` (a root directory whose processes
  run nowhere, or finish at once), `FinishedProcess`.
- `HostJail`: a stand-in jail whose processes run on the host, with the ExecSpec's env and pty.
- `Backends`: a SandboxManager over the fakes, the real registry and template store.
- `built_template_root`: real templates, built once into a cache and reused across runs.
- `zfs_test_pool`: a real zfs-fuse pool on a sparse file, torn down after.
"""

from coppice_jails.testing.backends import Backends
from coppice_jails.testing.fakes import (
    BackendFailure,
    FakeJail,
    FakeRuntime,
    FakeStorage,
    FinishedProcess,
)
from coppice_jails.testing.host import HostJail, HostProcess
from coppice_jails.testing.templates import (
    built_template_root,
    cached_template_store,
    install_dev_rootfs_template,
    recipes_digest,
    template_cache_dir,
)
from coppice_jails.testing.zfs import zfs_daemon_is_live, zfs_test_pool

__all__ = [
    "BackendFailure",
    "Backends",
    "FakeJail",
    "FakeRuntime",
    "FakeStorage",
    "FinishedProcess",
    "HostJail",
    "HostProcess",
    "built_template_root",
    "cached_template_store",
    "install_dev_rootfs_template",
    "recipes_digest",
    "template_cache_dir",
    "zfs_daemon_is_live",
    "zfs_test_pool",
]
