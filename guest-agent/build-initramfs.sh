#!/usr/bin/env bash
# Build tern's guest initramfs: a newc cpio with the agent as /init plus busybox-static.
#
#   guest-agent/build-initramfs.sh AGENT_BIN OUT_CPIO
#
# The same tree doubles as the demo rootfs for `tern run`. No device nodes: the agent mounts
# devtmpfs on /dev. The output is reproducible (fixed mtimes and owners, sorted entries,
# `cpio --reproducible`): the same agent and busybox give the same bytes. It is written
# atomically, so a reader never sees a half-written archive.
#
# Environment:
#   KEEP_SYMBOLS=1   keep the agent's debug info (default: strip; ~12 MB -> ~2 MB, and every
#                    initramfs byte is copied and unpacked at each boot)
#   BUSYBOX=PATH     use this static busybox instead of Debian's busybox-static
set -euo pipefail

usage() { echo "usage: $0 AGENT_BIN OUT_CPIO" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
# Absolute paths: the archive is assembled from inside a staging directory.
agent_bin=$(realpath -- "$1")
out=$(realpath -m -- "$2")
[[ -x $agent_bin ]] || { echo "error: $agent_bin is not an executable" >&2; exit 1; }

busybox=$(realpath -m -- "${BUSYBOX:-/bin/busybox}")

# Debian's busybox-static, installed on demand. dpkg may be locked by a concurrent install:
# retry for a while rather than fail.
ensure_busybox_static() {
    if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
        return
    fi
    local try
    for try in $(seq 1 30); do
        if DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null 2>&1; then
            return
        fi
        # The package list may simply be missing (fresh machine): refresh once, then retry.
        if [[ $try -eq 1 ]]; then
            apt-get update -q >/dev/null 2>&1 || true
        fi
        echo "waiting for apt/dpkg (attempt $try) ..." >&2
        sleep 10
    done
    echo "error: cannot install busybox-static" >&2
    exit 1
}

if [[ -z ${BUSYBOX:-} ]]; then
    ensure_busybox_static
fi
[[ -x $busybox ]] || { echo "error: $busybox not found" >&2; exit 1; }
if file -L "$busybox" | grep -q 'dynamically linked'; then
    # The guest has no libc: a dynamic busybox (Debian's `busybox` package) would not run.
    echo "error: $busybox is dynamically linked; install busybox-static" >&2
    exit 1
fi
if file -L "$agent_bin" | grep -q 'dynamically linked'; then
    echo "error: $agent_bin is dynamically linked; build it with -C target-feature=+crt-static" >&2
    exit 1
fi

stage=$(mktemp -d)
out_dir=$(dirname -- "$out")
mkdir -p -- "$out_dir"
tmp_out=$(mktemp -p "$out_dir" ".$(basename -- "$out").XXXXXX")
trap 'rm -rf -- "$stage" "$tmp_out"' EXIT

# --- the tree ---------------------------------------------------------------------------
cd "$stage"
mkdir -p bin dev proc sys/fs/cgroup run tmp etc root var/tmp usr
# Merged-/usr style links, so `#!/usr/bin/env sh` and absolute /sbin paths work.
ln -s bin sbin
ln -s ../bin usr/bin
ln -s ../bin usr/sbin

if [[ ${KEEP_SYMBOLS:-0} == 1 ]]; then
    cp -- "$agent_bin" init
else
    strip -o init -- "$agent_bin"
fi
cp -- "$busybox" bin/busybox

# One symlink per applet, all in /bin (the agent's default PATH covers it).
"$busybox" --list | LC_ALL=C sort -u | while read -r applet; do
    case $applet in
        ''|*/*|busybox) continue ;;
    esac
    ln -s busybox "bin/$applet"
done

cat > etc/passwd <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat > etc/group <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo tern > etc/hostname

# Modes are set explicitly so the caller's umask cannot change the archive.
chmod 0755 . bin dev proc sys sys/fs sys/fs/cgroup run etc var usr
chmod 0700 root
chmod 1777 tmp var/tmp
chmod 0755 init bin/busybox
chmod 0644 etc/passwd etc/group etc/hostname

# --- the archive ------------------------------------------------------------------------
find . -exec touch -h -d @0 {} +
find . -print0 \
    | LC_ALL=C sort -z \
    | cpio --create --null --format=newc --reproducible --owner=0:0 --quiet > "$tmp_out"
chmod 0644 "$tmp_out"
mv -f -- "$tmp_out" "$out"
trap 'rm -rf -- "$stage"' EXIT
echo "$out: $(stat -c %s -- "$out") bytes" >&2
