/*
 * coppice-init: PID 1 of a Coppice jail on Linux.
 *
 *   coppice-init [--netns NETNS_FILE] ROOT HOSTNAME SOCKET CGROUP_PROCS_FILE...
 *
 * 1. Writes its own pid into every CGROUP_PROCS_FILE, so it and every descendant are confined;
 *    with --netns, enters that network namespace (a bind mount the service prepared).
 * 2. unshare(mount, pid, uts, ipc) and fork: the child is PID 1 of the new pid namespace.
 *    The parent waits until the child is ready, prints the child's host pid on stdout and exits,
 *    so the jail outlives whoever started it (the service may restart; jails keep running).
 * 3. The child makes its mounts private, listens on SOCKET (a host path), makes ROOT its root
 *    (pivot_root; the host's mounts are detached from the namespace) and mounts /proc and a
 *    small /dev (device nodes, devpts, shm) there — by in-jail paths after the pivot, so a
 *    symlink planted in the sandbox cannot redirect a mount onto the host. /tmp is the
 *    sandbox's own directory (made if missing), not a mount.
 * 4. Then it reaps every process of the jail and serves requests on SOCKET.
 *
 * There is no user namespace, so root in a jail is real root. What keeps it inside the jail: no
 * host filesystem is mounted in its namespace at all; the processes it starts lose every
 * capability but a small set (no mount, chroot, mknod, raw network, ptrace, module or raw-io
 * capability); and /proc/sys and friends are read-only (kernel.core_pattern alone would run a
 * host program).
 *
 * Protocol: SOCK_SEQPACKET, one request or reply per packet, native byte order (same host).
 *   exec request  struct exec_req + gid_t groups[ngroups] + "cwd\0" + argv[argc] + env[envc]
 *                 (each NUL-terminated), with 3 fds (stdin, stdout, stderr) as SCM_RIGHTS unless
 *                 rows != 0, which asks for a new pseudo-terminal instead.
 *   reply         struct reply {REPLY_STARTED, pid} (+ the PTY master fd as SCM_RIGHTS), or
 *                 {REPLY_FAILED, errno} + a message ({REPLY_NO_WORKDIR, errno} when it was the
 *                 chdir to cwd that failed); later {REPLY_EXITED, pid, wait status} on the same
 *                 connection when that process ends.
 *   signal        struct signal_req -> {REPLY_SIGNALLED, pid, 0 or errno (ESRCH: no such pid)}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <grp.h>
#include <linux/capability.h>

enum { OP_EXEC = 1, OP_SIGNAL = 2 };
enum { REPLY_STARTED = 1, REPLY_FAILED = 2, REPLY_EXITED = 3, REPLY_SIGNALLED = 4, REPLY_NO_WORKDIR = 5 };

struct exec_req {
    uint32_t op, uid, gid, ngroups, argc, envc;
    uint16_t rows, cols;
};
struct signal_req {
    uint32_t op;
    int32_t pid, signo;
};
struct reply {
    uint32_t kind;
    int32_t pid, value; /* value: errno (FAILED, SIGNALLED) or wait status (EXITED) */
};

#define MAX_REQUEST (256 * 1024)
#define MAX_ARGS 16384

static char request[MAX_REQUEST] __attribute__((aligned(8)));

/* Jail processes started on behalf of a connection, so their exit is reported there. */
struct child { pid_t pid; int conn; };
static struct child *children;
static size_t nchildren, children_cap;

static int oom_protected; /* init has oom_score_adj -1000, which children must not inherit */

static struct pollfd *polls; /* [0] signalfd, [1] listening socket, then connections */
static size_t npolls, polls_cap;

static void die(int ready_fd, const char *what)
{
    char msg[512];
    int n = snprintf(msg, sizeof msg, "coppice-init: %s: %s", what, strerror(errno));
    if (ready_fd >= 0 && write(ready_fd, msg, (size_t)n) < 0) { /* nothing left to tell */ }
    _exit(1);
}

static void *grow(void *array, size_t *cap, size_t need, size_t item)
{
    if (need <= *cap) return array;
    size_t cap2 = *cap ? *cap * 2 : 16;
    while (cap2 < need) cap2 *= 2;
    void *p = realloc(array, cap2 * item);
    if (!p) { perror("coppice-init: realloc"); exit(1); }
    *cap = cap2;
    return p;
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, text, strlen(text));
    int saved = errno;
    close(fd);
    errno = saved;
    return n < 0 ? -1 : 0;
}

/* ---- jail setup (in the new namespaces) ------------------------------------------------- */

static void mount_or_die(int ready_fd, const char *src, const char *dst, const char *type,
                         unsigned long flags, const char *data)
{
    mkdir(dst, 0755); /* usually there already; if not, mount reports why */
    if (mount(src, dst, type, flags, data) < 0) die(ready_fd, dst);
}

/* What jailed processes keep (a subset of Docker's defaults; without CAP_SYS_CHROOT, the classic
   chroot escape is gone, and without CAP_NET_RAW no packet sniffing on the shared network). */
static const int kept_caps[] = {
    CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_KILL, CAP_SETGID, CAP_SETUID,
    CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_AUDIT_WRITE, CAP_SETFCAP,
};

static int drop_capabilities(void)
{
    for (int cap = 0; prctl(PR_CAPBSET_READ, cap) >= 0; cap++) {
        int keep = 0;
        for (size_t i = 0; i < sizeof kept_caps / sizeof kept_caps[0]; i++)
            keep |= kept_caps[i] == cap;
        if (!keep && prctl(PR_CAPBSET_DROP, cap) < 0) return -1;
    }
    return 0;
}

static void read_only(int ready_fd, const char *path)
{
    if (mount(path, path, NULL, MS_BIND | MS_REC, NULL) < 0 ||
        mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
              NULL) < 0)
        die(ready_fd, path);
}

static void setup_dev(int ready_fd)
{
    static const struct { const char *name; unsigned major, minor; } nodes[] = {
        {"/dev/null", 1, 3}, {"/dev/zero", 1, 5}, {"/dev/full", 1, 7},
        {"/dev/random", 1, 8}, {"/dev/urandom", 1, 9}, {"/dev/tty", 5, 0},
    };
    static const char *const links[][2] = {
        {"pts/ptmx", "/dev/ptmx"}, {"/proc/self/fd", "/dev/fd"}, {"/proc/self/fd/0", "/dev/stdin"},
        {"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"},
    };
    mount_or_die(ready_fd, "tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=1m");
    /* mknod instead of bind mounts from the host: after the pivot no host path is reachable. */
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++)
        if (mknod(nodes[i].name, S_IFCHR | 0666, makedev(nodes[i].major, nodes[i].minor)) < 0 ||
            chmod(nodes[i].name, 0666) < 0)
            die(ready_fd, nodes[i].name);
    mount_or_die(ready_fd, "devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620,gid=5");
    mount_or_die(ready_fd, "shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
        if (symlink(links[i][0], links[i][1]) < 0) die(ready_fd, links[i][1]);
}

static int listen_on(int ready_fd, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) { errno = ENAMETOOLONG; die(ready_fd, path); }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) die(ready_fd, "socket");
    unlink(path); /* a stale socket of an earlier jail with this id */
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || chmod(path, 0600) < 0 ||
        listen(fd, 128) < 0)
        die(ready_fd, path);
    return fd;
}

static void setup_jail(int ready_fd, const char *root, const char *hostname)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) die(ready_fd, "make / private");
    /* pivot_root, not chroot: the host's mounts leave this namespace for good. The namespace got
       a copy of every host mount at unshare; kept (as a chroot would), each copy would pin its
       filesystem — other sandboxes' clones included — until this jail ends. */
    if (mount(root, root, NULL, MS_BIND | MS_REC, NULL) < 0 || chdir(root) < 0 ||
        syscall(SYS_pivot_root, ".", ".") < 0 || umount2(".", MNT_DETACH) < 0 || chdir("/") < 0)
        die(ready_fd, root);
    mount_or_die(ready_fd, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    static const char *const kernel_knobs[] = {"/proc/sys", "/proc/sysrq-trigger", "/proc/irq",
                                               "/proc/bus", "/proc/fs"};
    for (size_t i = 0; i < sizeof kernel_knobs / sizeof kernel_knobs[0]; i++)
        if (access(kernel_knobs[i], F_OK) == 0) read_only(ready_fd, kernel_knobs[i]);
    setup_dev(ready_fd);
    /* /tmp stays on the sandbox's own disk, as in E2B: snapshots, forks and a pause keep it. */
    if (mkdir("/tmp", 0) == 0) chmod("/tmp", 01777);
    if (sethostname(hostname, strlen(hostname)) < 0) die(ready_fd, "sethostname");
    /* The OOM killer should pick a jail process, never the jail itself; children reset this.
       Best effort: it needs CAP_SYS_RESOURCE, which some containers withhold. */
    oom_protected = write_file("/proc/self/oom_score_adj", "-1000") == 0;
}

/* ---- exec ------------------------------------------------------------------------------- */

struct exec_args {
    struct exec_req hdr;
    gid_t *groups;
    char *cwd, **argv, **envp;
};

/* Splits the packet into its fields; 0 on success, else an errno. */
static int parse_exec(size_t len, struct exec_args *a, char **argv_envp)
{
    if (len < sizeof a->hdr) return EINVAL;
    memcpy(&a->hdr, request, sizeof a->hdr);
    size_t off = sizeof a->hdr;
    if (a->hdr.ngroups > 65536 || a->hdr.argc == 0 || (uint64_t)a->hdr.argc + a->hdr.envc + 3 > MAX_ARGS ||
        len - off < a->hdr.ngroups * sizeof(gid_t))
        return EINVAL;
    a->groups = (gid_t *)(request + off); /* the header keeps it 4-byte aligned */
    off += a->hdr.ngroups * sizeof(gid_t);
    size_t nstrings = 1 + a->hdr.argc + a->hdr.envc;
    for (size_t i = 0; i < nstrings; i++) {
        char *end = memchr(request + off, '\0', len - off);
        if (!end) return EINVAL;
        argv_envp[i] = request + off;
        off = (size_t)(end - request) + 1;
    }
    if (off != len) return EINVAL;
    a->cwd = argv_envp[0];
    a->argv = argv_envp + 1;
    a->envp = argv_envp + 2 + a->hdr.argc; /* argv is NULL-terminated in between */
    memmove(a->envp, argv_envp + 1 + a->hdr.argc, a->hdr.envc * sizeof(char *));
    a->argv[a->hdr.argc] = NULL;
    a->envp[a->hdr.envc] = NULL;
    return 0;
}

/* execve, searching PATH from the process's *new* environment (unlike glibc's execvpe). */
static void exec_in_path(char **argv, char **envp)
{
    if (strchr(argv[0], '/')) { execve(argv[0], argv, envp); return; }
    const char *path = "/usr/local/bin:/usr/bin:/bin";
    for (char **e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) path = *e + 5;
    int found_but_denied = 0;
    char full[4096];
    for (const char *dir = path;; dir++) {
        const char *colon = strchrnul(dir, ':');
        int n = snprintf(full, sizeof full, "%.*s%s%s", (int)(colon - dir), dir,
                         colon == dir ? "" : "/", argv[0]);
        if (n > 0 && (size_t)n < sizeof full) {
            execve(full, argv, envp);
            if (errno == EACCES) found_but_denied = 1;
            else if (errno != ENOENT && errno != ENOTDIR) return;
        }
        if (!*colon) break;
        dir = colon;
    }
    errno = found_but_denied ? EACCES : ENOENT;
}

/* In the forked child: become the requested process; on failure report on err_fd as
 * "<errno> <reply kind> <stage>: <strerror>". */
static void become(const struct exec_args *a, const int *stdio, int pty_master, int err_fd)
{
    const char *stage = "setsid";
    int kind = REPLY_FAILED;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL); /* no SIG_IGN from the starter */
    if (oom_protected && write_file("/proc/self/oom_score_adj", "0") < 0) {
        stage = "oom_score_adj";
        goto fail;
    }
    if (setsid() < 0) goto fail;
    if (pty_master >= 0) {
        stage = "open pty";
        int slave = open(ptsname(pty_master), O_RDWR | O_CLOEXEC);
        if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0 || fchown(slave, a->hdr.uid, (gid_t)-1) < 0)
            goto fail;
        for (int i = 0; i < 3; i++)
            if (dup2(slave, i) < 0) goto fail;
    } else {
        stage = "dup2";
        for (int i = 0; i < 3; i++)
            if (dup2(stdio[i], i) < 0) goto fail; /* dup2 clears CLOEXEC on 0..2 */
    }
    stage = "drop capabilities";
    if (drop_capabilities() < 0) goto fail;
    stage = "set user";
    if (setgroups(a->hdr.ngroups, a->groups) < 0 || setgid(a->hdr.gid) < 0 || setuid(a->hdr.uid) < 0)
        goto fail;
    stage = a->cwd;
    kind = REPLY_NO_WORKDIR;
    if (chdir(a->cwd) < 0) goto fail;
    kind = REPLY_FAILED;
    umask(022);
    stage = a->argv[0];
    exec_in_path(a->argv, a->envp);
fail:;
    char msg[512];
    int err = errno;
    int n = snprintf(msg, sizeof msg, "%d %d %s: %s", err, kind, stage, strerror(err));
    if (write(err_fd, msg, (size_t)n) < 0) { /* the parent sees a bare failure then */ }
    _exit(127);
}

static void send_reply(int conn, uint32_t kind, int32_t pid, int32_t value, const char *text, int fd)
{
    char buf[sizeof(struct reply) + 512];
    struct reply r = {kind, pid, value};
    size_t len = sizeof r;
    memcpy(buf, &r, sizeof r);
    if (text) {
        size_t n = strnlen(text, 511);
        memcpy(buf + len, text, n);
        len += n;
    }
    struct iovec iov = {buf, len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    char cmsgbuf[CMSG_SPACE(sizeof(int))];
    if (fd >= 0) {
        msg.msg_control = cmsgbuf;
        msg.msg_controllen = sizeof cmsgbuf;
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof fd);
    }
    /* Never block the jail on a client that does not read; a lost reply is its problem. */
    sendmsg(conn, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static int open_pty(uint16_t rows, uint16_t cols)
{
    int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) return -1;
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    if (unlockpt(master) < 0 || ioctl(master, TIOCSWINSZ, &ws) < 0) {
        int saved = errno;
        close(master);
        errno = saved;
        return -1;
    }
    return master;
}

static void handle_exec(int conn, size_t len, const int *fds, size_t nfds)
{
    static char *argv_envp[MAX_ARGS];
    struct exec_args a;
    int err = parse_exec(len, &a, argv_envp);
    int pty_master = -1;
    if (!err && ((a.hdr.rows != 0) != (nfds == 0) || (nfds != 0 && nfds != 3))) err = EINVAL;
    if (!err && a.hdr.rows != 0 && (pty_master = open_pty(a.hdr.rows, a.hdr.cols)) < 0) err = errno;
    int errpipe[2] = {-1, -1};
    if (!err && pipe2(errpipe, O_CLOEXEC) < 0) err = errno;
    if (err) {
        send_reply(conn, REPLY_FAILED, 0, err, "bad exec request", -1);
        goto out;
    }
    pid_t pid = fork();
    if (pid == 0) {
        close(errpipe[0]);
        become(&a, fds, pty_master, errpipe[1]);
    }
    close(errpipe[1]);
    if (pid < 0) {
        send_reply(conn, REPLY_FAILED, 0, errno, "fork", -1);
        goto out;
    }
    /* The pipe closes on a successful execve (CLOEXEC) or carries the failure. */
    char msg[512];
    ssize_t n;
    do n = read(errpipe[0], msg, sizeof msg - 1); while (n < 0 && errno == EINTR);
    if (n > 0) {
        msg[n] = '\0';
        char *kind = strchr(msg, ' ');
        char *text = kind ? strchr(kind + 1, ' ') : NULL;
        waitpid(pid, NULL, 0);
        send_reply(conn, kind && atoi(kind + 1) == REPLY_NO_WORKDIR ? REPLY_NO_WORKDIR : REPLY_FAILED,
                   0, atoi(msg), text ? text + 1 : msg, -1);
        goto out;
    }
    children = grow(children, &children_cap, nchildren + 1, sizeof *children);
    children[nchildren++] = (struct child){pid, conn};
    send_reply(conn, REPLY_STARTED, pid, 0, NULL, pty_master);
out:
    if (errpipe[0] >= 0) close(errpipe[0]);
    if (pty_master >= 0) close(pty_master);
}

static void handle_signal(int conn, size_t len)
{
    struct signal_req r = {0, 0, 0};
    int err = 0;
    if (len != sizeof r) {
        send_reply(conn, REPLY_FAILED, 0, EINVAL, "bad signal request", -1);
        return;
    }
    memcpy(&r, request, sizeof r);
    /* pid 1 is this init: killing it is stop()'s job, from the host. */
    if (r.pid <= 1) err = ESRCH;
    else if (kill(r.pid, r.signo) < 0) err = errno;
    send_reply(conn, REPLY_SIGNALLED, r.pid, err, NULL, -1);
}

/* ---- the loop --------------------------------------------------------------------------- */

static void close_conn(size_t index)
{
    int conn = polls[index].fd;
    for (size_t i = 0; i < nchildren; i++)
        if (children[i].conn == conn) children[i].conn = -1;
    close(conn);
    polls[index] = polls[--npolls];
}

static void serve_conn(size_t index)
{
    int conn = polls[index].fd;
    char cmsgbuf[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {request, sizeof request};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = cmsgbuf, .msg_controllen = sizeof cmsgbuf};
    ssize_t len = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (len < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (len <= 0) { close_conn(index); return; }
    int fds[3];
    size_t nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < n; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (nfds < 3) fds[nfds++] = fd;
                else close(fd);
            }
        }
    uint32_t op = 0;
    if ((size_t)len >= sizeof op) memcpy(&op, request, sizeof op);
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
        send_reply(conn, REPLY_FAILED, 0, E2BIG, "request too large", -1);
    else if (op == OP_EXEC)
        handle_exec(conn, (size_t)len, fds, nfds);
    else if (op == OP_SIGNAL)
        handle_signal(conn, (size_t)len);
    else
        send_reply(conn, REPLY_FAILED, 0, EINVAL, "unknown request", -1);
    for (size_t i = 0; i < nfds; i++) close(fds[i]); /* the child holds its copies */
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (size_t i = 0; i < nchildren; i++)
            if (children[i].pid == pid) {
                if (children[i].conn >= 0)
                    send_reply(children[i].conn, REPLY_EXITED, pid, status, NULL, -1);
                children[i] = children[--nchildren];
                break;
            }
}

static void add_poll(int fd)
{
    polls = grow(polls, &polls_cap, npolls + 1, sizeof *polls);
    polls[npolls++] = (struct pollfd){.fd = fd, .events = POLLIN};
}

static _Noreturn void serve(int sig_fd, int listen_fd)
{
    add_poll(sig_fd);
    add_poll(listen_fd);
    for (;;) {
        if (poll(polls, npolls, -1) < 0) continue; /* EINTR */
        if (polls[0].revents) {
            struct signalfd_siginfo si;
            while (read(sig_fd, &si, sizeof si) == sizeof si)
                if (si.ssi_signo == SIGTERM) exit(0); /* the kernel kills the rest of the jail */
            reap();
        }
        if (polls[1].revents) {
            int conn;
            while ((conn = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0)
                add_poll(conn);
        }
        /* Backwards, since close_conn moves the last entry into the closed one's place. */
        for (size_t i = npolls; i-- > 2;)
            if (polls[i].revents) serve_conn(i);
    }
}

/* /proc/1/cmdline is readable in the jail: host paths (data dir, root, cgroups) stay out of it. */
static void hide_arguments(int argc, char **argv)
{
    char *end = argv[argc - 1] + strlen(argv[argc - 1]);
    memset(argv[0], 0, (size_t)(end - argv[0]));
    strncpy(argv[0], "coppice-init", (size_t)(end - argv[0]));
}

int main(int argc, char **argv)
{
    const char *netns = NULL;
    int first = 1; /* the first positional argument */
    if (argc > 2 && strcmp(argv[1], "--netns") == 0) {
        netns = argv[2];
        first = 3;
    }
    if (argc - first < 3) {
        fprintf(stderr, "usage: %s [--netns FILE] ROOT HOSTNAME SOCKET [CGROUP_PROCS_FILE...]\n",
                argv[0]);
        return 2;
    }
    char **all_argv = argv; /* all of it is hidden later */
    int all_argc = argc;
    argv += first - 1; /* from here on argv[1] is ROOT, as without --netns */
    argc -= first - 1;
    char *root = strdup(argv[1]), *hostname = strdup(argv[2]), *sock_path = strdup(argv[3]);
    if (!root || !hostname || !sock_path) die(-1, "strdup");
    /* If the starter dies before the jail is ready, so does the jail: nothing half-made escapes
       the cgroups (pids are written next) and the starter's cleanup finds everything. */
    pid_t starter = getppid();
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != starter) return 1;
    setsid(); /* not in the service's process group: its Ctrl-C must not reach jails */
    char self[32];
    snprintf(self, sizeof self, "%d\n", getpid());
    for (int i = 4; i < argc; i++)
        if (write_file(argv[i], self) < 0) die(-1, argv[i]);
    if (netns) {
        int ns_fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (ns_fd < 0 || setns(ns_fd, CLONE_NEWNET) < 0) die(-1, "setns(network)");
        close(ns_fd);
    }
    if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC) < 0) die(-1, "unshare");
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) < 0) die(-1, "pipe");
    pid_t child = fork();
    if (child < 0) die(-1, "fork");
    if (child > 0) {
        close(ready[1]);
        char msg[512];
        ssize_t n = read(ready[0], msg, sizeof msg - 1);
        if (n == 1 && msg[0] == '!') {
            printf("%d\n", child);
            return 0;
        }
        fprintf(stderr, "%.*s\n", n > 0 ? (int)n : 0, n > 0 ? msg : "coppice-init: jail died");
        return 1;
    }
    close(ready[0]);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0) die(ready[1], "prctl");
    hide_arguments(all_argc, all_argv);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sig_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sig_fd < 0) die(ready[1], "signalfd");
    int listen_fd = listen_on(ready[1], sock_path);
    setup_jail(ready[1], root, hostname);
    int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null_fd < 0) die(ready[1], "/dev/null");
    for (int i = 0; i < 3; i++) dup2(null_fd, i); /* the starter's pipes must see EOF */
    close(null_fd);
    /* Ready: from here on the jail lives on its own, whatever happens to the starter. */
    if (prctl(PR_SET_PDEATHSIG, 0) < 0 || write(ready[1], "!", 1) != 1) _exit(1);
    close(ready[1]);
    serve(sig_fd, listen_fd);
}
