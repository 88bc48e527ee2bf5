# Shared, idempotent setup for scripts/serve and scripts/test (sourced, not run).
# Installs what Coppice needs on a Debian 12 machine: system packages (as root), a .venv with the
# locked Python dependencies (requirements/*.lock, refreshed by scripts/update-lock) and the
# project, and with `dev` the test tools (the dev lock, npm SDKs and buf from package-lock.json).
set -euo pipefail

COPPICE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COPPICE_VENV:-$COPPICE_ROOT/.venv}"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

apt_install() {
    # Install only the Debian packages whose command or file is missing.
    local missing=()
    while [ $# -gt 0 ]; do
        local probe="$1" pkg="$2"; shift 2
        if [[ "$probe" == /* ]]; then [ -e "$probe" ] || missing+=("$pkg")
        else command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg"); fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing system packages: ${missing[*]} (run as root to install them)"; return 1
    fi
    log "apt-get install ${missing[*]}"
    if [ ! -f /var/lib/coppice-apt-updated ] || [ -n "$(find /var/lib/apt/lists -maxdepth 0 -mmin +1440 2>/dev/null)" ]; then
        apt-get update -qq && mkdir -p /var/lib && touch /var/lib/coppice-apt-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

setup_system() {
    # command-or-path  package
    apt_install \
        zfs zfs-fuse  zpool zfs-fuse  debootstrap debootstrap  unshare util-linux \
        nsenter util-linux  ip iproute2  cc gcc  /usr/include/stdio.h libc6-dev \
        mount mount  tar tar  gzip gzip  /etc/ssl/certs/ca-certificates.crt ca-certificates \
        nft nftables
    if [ "${1:-}" = dev ]; then
        # The Go client (clients/go): Go, protoc and its Go plugins, grpc-go's sources; named
        # protobuf 1-5, else apt satisfies grpc's dependency with 1-3, which predates APIv2.
        apt_install node nodejs  npm npm  dnsmasq dnsmasq-base  git git  strace strace \
            go golang-go  protoc protobuf-compiler  protoc-gen-go protoc-gen-go \
            protoc-gen-go-grpc protoc-gen-go-grpc \
            /usr/share/gocode/src/google.golang.org/grpc golang-google-grpc-dev \
            /usr/share/gocode/src/google.golang.org/protobuf golang-github-golang-protobuf-1-5-dev
    fi
}

pick_python() {
    local py
    # 3.11 first: the locks are compiled for it (Debian 12's python3).
    for py in "${PYTHON:-}" python3.11 python3 python3.13 python3.12; do
        [ -n "$py" ] || continue
        if command -v "$py" >/dev/null 2>&1 && "$py" -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    log "Python >= 3.11 not found"; return 1
}

lock_stamp() {
    # What a venv set up from requirements/$1.lock holds: the lock's and pyproject.toml's digest.
    echo "$1-$(cat "$COPPICE_ROOT/requirements/$1.lock" "$COPPICE_ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
}

setup_venv() {
    # The locked dependencies (service.lock, or dev.lock with `dev`: service + dev extras), then
    # the project itself, editable, with --no-deps (setuptools comes from the lock too).
    local lock=service py want current
    [ "${1:-}" = dev ] && lock=dev
    py="$(pick_python)"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV with $py"
        if ! "$py" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"; apt_install /usr/share/doc/python3-venv python3-venv; "$py" -m venv "$VENV"
        fi
    fi
    # Reinstall only when the lock or pyproject.toml changed. A venv set up from the current dev
    # lock also serves: scripts/update-lock gives the two locks the same versions where they meet.
    want="$(lock_stamp "$lock")"
    current="$(cat "$VENV/.coppice-installed" 2>/dev/null || true)"
    if [ "$current" != "$want" ] && { [ "$lock" = dev ] || [ "$current" != "$(lock_stamp dev)" ]; }; then
        log "pip install -r requirements/$lock.lock, then -e . --no-deps (progress below)"
        "$VENV/bin/python" -m pip install -q --upgrade pip >&2
        "$VENV/bin/python" -m pip install --progress-bar on --require-hashes \
            -r "$COPPICE_ROOT/requirements/$lock.lock" >&2
        "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$COPPICE_ROOT" >&2
        echo "$want" > "$VENV/.coppice-installed"
    fi
}

setup_node() {
    # The official Node SDKs and buf, for the tests: exactly tests/node/package-lock.json.
    local dir="$COPPICE_ROOT/tests/node" stamp want
    want="$(cat "$dir/package.json" "$dir/package-lock.json" | sha256sum | cut -c1-16)"
    stamp="$dir/node_modules/.coppice-installed"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        log "npm ci (tests/node: e2b, @e2b/code-interpreter, @bufbuild/buf)"
        (cd "$dir" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error >&2)
        echo "$want" > "$stamp"
    fi
}
