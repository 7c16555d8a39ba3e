#!/usr/bin/env bash
# Build tern's guest kernel from Debian's linux-source-6.1 package and the
# kconfig fragment next to this script, cached by content hash.
#
#   build-kernel.sh               build if needed; print the artifact paths
#   build-kernel.sh --print-path  print the cache dir for the current key only
#   build-kernel.sh --rebuild     ignore an existing cache entry
#
# Cache: ${TERN_CACHE:-$HOME/.cache/tern}/kernel/<key>/{vmlinux,bzImage,config,System.map,build-info}
#        ${TERN_CACHE:-$HOME/.cache/tern}/kernel/current -> <key>
# key = sha256(fragment + this script + installed linux-source-6.1 version).
#
# stdout carries only the result (KEY=VALUE lines, or the bare path for
# --print-path); progress and the kernel build log go to stderr.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SCRIPT")"
FRAGMENT="$HERE/tern.config"
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
# lz4: the bzImage payload is LZ4-compressed (CONFIG_KERNEL_LZ4), fastest to unpack.
DEPS=(linux-source-6.1 bc flex bison libelf-dev libssl-dev build-essential cpio xz-utils lz4)
CACHE_ROOT="${TERN_CACHE:-$HOME/.cache/tern}/kernel"

log() { printf '[build-kernel] %s\n' "$*" >&2; }
die() { printf '[build-kernel] error: %s\n' "$*" >&2; exit 1; }

usage() {
    awk 'NR>1 && !/^#/{exit} NR>1{sub(/^# ?/,""); print}' "$SCRIPT"
}

mode=build
rebuild=0
for arg in "$@"; do
    case "$arg" in
        --print-path) mode=print ;;
        --rebuild) rebuild=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

[[ -f "$FRAGMENT" ]] || die "fragment not found: $FRAGMENT"

pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

src_version() {
    pkg_installed "$SRC_PKG" || return 1
    dpkg-query -W -f='${Version}' "$SRC_PKG"
}

cache_key() {
    local ver="$1"
    {
        printf 'fragment\n'; cat "$FRAGMENT"
        printf '\nscript\n'; cat "$SCRIPT"
        printf '\n%s %s\n' "$SRC_PKG" "$ver"
    } | sha256sum | cut -d' ' -f1
}

# --- apt dependencies --------------------------------------------------------
as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root to run: $*"
    fi
}

apt_install() {
    # Another process may hold the dpkg lock: apt waits for it (Lock::Timeout),
    # and we retry a few times on top of that in case of a lock race.
    local attempt
    for attempt in 1 2 3 4 5 6; do
        if as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                -o DPkg::Lock::Timeout=600 "$@" >&2; then
            return 0
        fi
        log "apt-get install failed (attempt $attempt); retrying in 10s"
        sleep 10
    done
    return 1
}

ensure_deps() {
    local missing=() p
    for p in "${DEPS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing missing packages: ${missing[*]}"
    local unknown=0
    for p in "${missing[@]}"; do
        apt-cache show "$p" >/dev/null 2>&1 || unknown=1
    done
    if [[ $unknown -eq 1 ]]; then
        log "package lists lack some of them; running apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q \
            -o DPkg::Lock::Timeout=600 >&2
    fi
    apt_install "${missing[@]}" || die "could not install: ${missing[*]}"
    for p in "${missing[@]}"; do pkg_installed "$p" || die "package still missing: $p"; done
}

# --- --print-path: no side effects -------------------------------------------
if [[ $mode == print ]]; then
    ver="$(src_version)" || die "$SRC_PKG is not installed; run $SCRIPT once to install it and build"
    printf '%s\n' "$CACHE_ROOT/$(cache_key "$ver")"
    exit 0
fi

ensure_deps
[[ -f "$SRC_TARBALL" ]] || die "$SRC_TARBALL missing although $SRC_PKG is installed"
VER="$(src_version)"
KEY="$(cache_key "$VER")"
OUT="$CACHE_ROOT/$KEY"

set_current() {
    # Atomic symlink swap: current -> <key> (relative, so the cache can move).
    ln -sfn "$KEY" "$CACHE_ROOT/.current.$$"
    mv -T "$CACHE_ROOT/.current.$$" "$CACHE_ROOT/current"
}

report() {
    set_current
    printf 'TERN_KERNEL_DIR=%s\n' "$OUT"
    printf 'TERN_VMLINUX=%s\n' "$OUT/vmlinux"
    printf 'TERN_BZIMAGE=%s\n' "$OUT/bzImage"
    printf 'TERN_KERNEL_CURRENT=%s\n' "$CACHE_ROOT/current"
}

complete() { [[ -s "$OUT/vmlinux" && -s "$OUT/bzImage" ]]; }

mkdir -p "$CACHE_ROOT"
if [[ $rebuild -eq 0 ]] && complete; then
    log "cached: $OUT"
    report
    exit 0
fi

# Serialise concurrent builds of the same key; the second one finds the cache.
mkdir -p "$CACHE_ROOT/.locks"
exec 9>"$CACHE_ROOT/.locks/$KEY"
if ! flock -n 9; then
    log "another build of $KEY is running; waiting for it"
    flock 9
fi
if [[ $rebuild -eq 0 ]] && complete; then
    log "cached (built concurrently): $OUT"
    report
    exit 0
fi

# Leftovers of interrupted builds of this key (we hold its lock).
rm -rf "$CACHE_ROOT/.build-$KEY".*
TMP="$(mktemp -d "$CACHE_ROOT/.build-$KEY.XXXXXX")"
cleanup() {
    if [[ "${TERN_KEEP_BUILD:-0}" == 1 ]]; then
        log "keeping build tree: $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$SECONDS
log "key $KEY ($SRC_PKG $VER)"
log "unpacking $SRC_TARBALL into $TMP"
tar -xf "$SRC_TARBALL" -C "$TMP"
SRC="$TMP/linux-source-6.1"
[[ -d "$SRC" ]] || die "unexpected tarball layout (no linux-source-6.1/)"
cd "$SRC"

log "configuring: tinyconfig + $(basename "$FRAGMENT") + olddefconfig"
{
    make -s tinyconfig &&
    sh scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" &&
    make -s olddefconfig
} >"$TMP/config.log" 2>&1 || { cat "$TMP/config.log" >&2; die "configuration failed"; }

# Every fragment line must survive olddefconfig. A "# CONFIG_X is not set" line
# is also satisfied when X is absent (its dependencies are off, so it is off).
verify_config() {
    local line sym bad=()
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            grep -qxF -- "$line" .config || bad+=("want '$line', got '$(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" .config || echo absent)'")
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym="${BASH_REMATCH[1]}"
            if grep -qE "^${sym}=" .config; then
                bad+=("want '$line', got '$(grep -E "^${sym}=" .config)'")
            fi
        fi
    done <"$FRAGMENT"
    if [[ ${#bad[@]} -gt 0 ]]; then
        log "the final .config does not match the fragment (${#bad[@]} mismatches):"
        printf '  %s\n' "${bad[@]}" >&2
        return 1
    fi
}
verify_config || die "fix $FRAGMENT (a dependency is probably missing or a symbol was renamed)"
log "config verified: every fragment line is in .config"

log "building bzImage + vmlinux with make -j$(nproc) (a few minutes)"
export KBUILD_BUILD_USER=tern KBUILD_BUILD_HOST=tern
make -j"$(nproc)" bzImage vmlinux >&2
build_secs=$((SECONDS - start))

[[ "$(od -An -tx1 -N5 vmlinux | tr -d ' ')" == 7f454c4602 ]] || die "vmlinux is not a 64-bit ELF file"
[[ -s arch/x86/boot/bzImage ]] || die "bzImage missing"

STAGE="$TMP/out"
mkdir "$STAGE"
cp vmlinux "$STAGE/vmlinux"
cp arch/x86/boot/bzImage "$STAGE/bzImage"
cp .config "$STAGE/config"
cp System.map "$STAGE/System.map"
{
    printf 'key=%s\n' "$KEY"
    printf 'source=%s %s\n' "$SRC_PKG" "$VER"
    printf 'release=%s\n' "$(make -s kernelrelease)"
    printf 'built=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'build_seconds=%s\n' "$build_secs"
    printf 'fragment_sha256=%s\n' "$(sha256sum "$FRAGMENT" | cut -d' ' -f1)"
} >"$STAGE/build-info"

cd "$CACHE_ROOT"
if [[ -e "$OUT" ]]; then
    # --rebuild or a half-written entry: move it aside, then swap in.
    mv -T "$OUT" "$TMP/old"
fi
mv -T "$STAGE" "$OUT"
log "built in ${build_secs}s: $(du -h --apparent-size "$OUT/bzImage" | cut -f1) bzImage, $(du -h --apparent-size "$OUT/vmlinux" | cut -f1) vmlinux"
report
