"""The files API and processes see one filesystem: the sandbox as its processes see it, with
the jail's own mounts (/tmp, /dev, /dev/shm, /proc), through the official `e2b` SDK against a
real `coppice serve`."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pytest
from e2b import FileType, Sandbox
from e2b.exceptions import SandboxException
from fixtures.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sbx(coppice_stack: Stack) -> Iterator[Sandbox]:
    with pytest.MonkeyPatch.context() as env:
        for key, value in coppice_stack.sdk_env().items():
            env.setenv(key, value)
        with Sandbox.create(template="base", timeout=300) as sandbox:
            yield sandbox


@pytest.mark.parametrize("directory", ["/tmp", "/dev/shm", "/home/user"])
def test_a_file_written_through_the_api_is_seen_by_a_process(sbx: Sandbox, directory: str) -> None:
    path = posixpath.join(directory, "from-api.txt")
    sbx.files.write(path, "written by files.write\n")
    assert sbx.commands.run(f"cat {path}").stdout == "written by files.write\n"
    assert sbx.commands.run(f"stat -c %U {path}").stdout.strip() == "user"


@pytest.mark.parametrize("directory", ["/tmp", "/dev/shm", "/home/user"])
def test_a_file_written_by_a_process_is_seen_through_the_api(sbx: Sandbox, directory: str) -> None:
    path = posixpath.join(directory, "from-process.txt")
    sbx.commands.run(f"echo made by a process > {path}")
    assert sbx.files.read(path) == "made by a process\n"
    assert sbx.files.exists(path)
    names = [entry.name for entry in sbx.files.list(directory)]
    assert "from-process.txt" in names


def test_proc_is_the_sandbox_s_own(sbx: Sandbox) -> None:
    boot_id = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
    assert sbx.files.read("/proc/sys/kernel/random/boot_id") == boot_id
    listed = {entry.name for entry in sbx.files.list("/proc")}
    assert {"1", "meminfo", "sys"} <= listed  # pid 1 is the jail's init, not the host's
    seen_by_ps = set(sbx.commands.run("ls /proc").stdout.split())
    host_only = {name for name in listed - seen_by_ps if name.isdigit()}
    assert not host_only  # no process of the host (the listing may miss ls's own pid)


def test_a_pseudo_file_that_fails_to_read_is_a_clear_error(sbx: Sandbox) -> None:
    # /proc/1/mem has size 0 and fails with EIO at offset 0: the download must say so, and
    # must not close its file twice (a second close hits whatever file got the number meanwhile).
    with pytest.raises(SandboxException, match="error reading file '/proc/1/mem'"):
        sbx.files.read("/proc/1/mem")
    assert sbx.files.read("/proc/sys/kernel/random/boot_id")
    assert sbx.commands.run("true").exit_code == 0


def test_dev_is_the_sandbox_s_own(sbx: Sandbox) -> None:
    # The SDK lists only files and directories, or links to them (devices have no FileType), and
    # /proc/self means the reader: links into it (/dev/fd, /dev/stdin) lead nowhere for the
    # gateway, which is no process of the sandbox.
    listed = {entry.name for entry in sbx.files.list("/dev")}
    assert {"pts", "shm"} <= listed
    seen = sbx.commands.run(
        r"find /dev -mindepth 1 -maxdepth 1 \( -xtype f -o -xtype d \)"
        r" ! -lname '/proc/self*' -printf '%f\n'"
    ).stdout
    assert listed == set(seen.split())
    assert sbx.files.exists("/dev/null")


def test_a_directory_symlink_leads_to_the_same_place_both_ways(sbx: Sandbox) -> None:
    sbx.commands.run("mkdir -p /tmp/real-dir && ln -sfn /tmp/real-dir /home/user/dir-link")
    sbx.files.write("/home/user/dir-link/via-api.txt", "api")
    assert sbx.commands.run("cat /tmp/real-dir/via-api.txt").stdout == "api"
    sbx.commands.run("echo process > /home/user/dir-link/via-process.txt")
    assert sbx.files.read("/tmp/real-dir/via-process.txt") == "process\n"
    link = sbx.files.get_info("/home/user/dir-link")
    assert (link.type, link.symlink_target) == (FileType.SYMLINK, "/tmp/real-dir")


def test_a_file_made_by_another_user_is_seen_with_its_owner(sbx: Sandbox) -> None:
    sbx.commands.run("echo secret > /tmp/root-only && chmod 600 /tmp/root-only", user="root")
    info = sbx.files.get_info("/tmp/root-only")
    assert (info.owner, info.permissions) == ("root", "-rw-------")
    assert sbx.files.read("/tmp/root-only", user="root") == "secret\n"
    sbx.files.write("/tmp/by-root-api", "r", user="root")
    assert sbx.commands.run("stat -c %U:%a /tmp/by-root-api").stdout.strip() == "root:644"


def test_git_works_through_the_sdk(sbx: Sandbox) -> None:
    repo = "/home/user/project"
    sbx.git.init(repo, initial_branch="main")
    assert sbx.files.exists(f"{repo}/.git")
    sbx.files.write(f"{repo}/README.md", "# hello\n")
    status = sbx.git.status(repo)
    assert [(f.name, f.status) for f in status.file_status] == [("README.md", "untracked")]
    sbx.git.add(repo, all=True)
    sbx.git.commit(repo, "first", author_name="Coppice", author_email="c@example.invalid")
    assert sbx.commands.run("git log --format=%s", cwd=repo).stdout == "first\n"
    assert sbx.git.status(repo).is_clean
