#!/usr/bin/env python3
"""Write the hand-made seeds of fuzz/corpus/<target>/seed-*: each spells out, in the encoding
its harness reads (see the harness modules named in fuzz/README.md), a well-behaved session a
fuzzer would take long to find on its own. Run from the repository root; idempotent."""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


u8 = lambda v: struct.pack("<B", v)
u16 = lambda v: struct.pack("<H", v)
u32 = lambda v: struct.pack("<I", v)
u64 = lambda v: struct.pack("<Q", v)

# --- mmio: vmm/src/fuzzing/mmio.rs
def mmio_queue(sel, size, desc, avail, used):
    b = u8(4) + u8(sel) + u16(size)
    for a in (desc, avail, used):
        b += u16(a) + u8(0)
    return b

negotiate = u8(3) + u64((1 << 32) | (1 << 29) | 1)
queues = mmio_queue(0, 16, 0x1000, 0x2000, 0x3000) + mmio_queue(1, 256, 0x4000, 0x6000, 0x7000)
reads = b"".join(u8(1) + u8(r // 4) for r in (0, 4, 8, 0xC, 0x10, 0x34, 0x44, 0x60, 0x70, 0xFC, 0x100, 0xB0))
put("mmio", "activate-reset", negotiate + queues + u8(5) + u8(0) + reads + u8(0) + u8(0x64 // 4) + u32(3) + u8(5) + u8(1) + negotiate)
put("mmio", "no-version-1", u8(3) + u64(1) + queues + u8(5) + u8(0) + reads)
put("mmio", "config-bytes", u8(2) + u16(0x100) + u8(1) + b"" + u8(1) + u8(2) + u16(0x10A) + u8(4) + b"" + u8(1)
    + u8(2) + u16(0x70) + u8(2) + b"\x01\x00" + u8(0) + u8(2) + u16(0xFFF) + u8(8) + b"" + u8(1))
put("mmio", "queue-outside-memory", negotiate + mmio_queue(0, 16, 0xFFF0, 0x2000, 0x3000) + u8(4) + u8(1) + u16(512)
    + u16(0) + u8(0xFF) + u16(0) + u8(0) + u16(0) + u8(0) + u8(5) + u8(0) + reads)

# --- virtio_fs: vmm/src/fuzzing/fs.rs
def fuse(opcode, node, body, cap=0x1000):
    return u8(0) + u8(opcode) + u8(node) + u16(len(body)) + body + u8(0) + u16(0) + u8(0) + u16(cap)

ROOT, SHARE_ROOT = 1, 0x21  # the VFS root; share 1's root (fs index 1 << 56 | inode 1)
name = lambda s: s.encode() + b"\0"
lookups = fuse(1, ROOT, name("s0")) + fuse(1, SHARE_ROOT, name("file")) + fuse(1, SHARE_ROOT, name("up")) \
    + fuse(1, SHARE_ROOT, name("abs")) + fuse(1, SHARE_ROOT, name("dir"))
put("virtio_fs", "lookups", b"\0" + u32(0) + lookups)
put("virtio_fs", "open-read", b"\0" + u32(0) + lookups + fuse(14, 0x22, u32(0) + u32(0))
    + fuse(15, 0x22, u64(0) + u64(0) + u32(4096) + u32(0) + u64(0) + u32(0) + u32(0)) + fuse(3, 0x22, u32(0) + u32(0) + u64(0)))
put("virtio_fs", "readlink-escape", b"\0" + u32(0) + lookups + fuse(5, 0x23, b"") + fuse(1, 0x23, name("secret"))
    + fuse(14, 0x24, u32(0) + u32(0)))
put("virtio_fs", "create-write", b"\0" + u32(0) + fuse(1, ROOT, name("s0"))
    + fuse(35, SHARE_ROOT, u32(0o102) + u32(0o644) + u32(0) + u32(0) + name("new"))
    + fuse(16, 0x22, u64(0) + u64(0) + u32(5) + u32(0) + u64(0) + u32(0) + u32(0) + b"hello")
    + fuse(9, SHARE_ROOT, u32(0o755) + u32(0) + name("sub")) + fuse(6, SHARE_ROOT, name("ln") + name("../outside/secret"))
    + fuse(12, SHARE_ROOT, u64(0x21) + name("new") + name("renamed")) + fuse(10, SHARE_ROOT, name("renamed")))
put("virtio_fs", "readdir", b"\0" + u32(0) + fuse(1, ROOT, name("s0")) + fuse(27, SHARE_ROOT, u32(0) + u32(0))
    + fuse(28, SHARE_ROOT, u64(0) + u64(0) + u32(4096) + u32(0) + u64(0) + u32(0) + u32(0)))
put("virtio_fs", "read-only-create", b"\x80" + u32(0) + fuse(1, ROOT, name("s0"))
    + fuse(35, SHARE_ROOT, u32(0o102) + u32(0o644) + u32(0) + u32(0) + name("new")))

# --- vsock: vmm/src/fuzzing/vsock.rs
def tx(op, dst, payload=b"", flags=0, buf_alloc=1 << 16, fwd=0, src=0):
    d = {52: u8(0)}.get(dst, None)
    d = d if d is not None else u8(1) + u8(dst)
    return u8(0) + u8(0) + u8(src) + d + u8(op) + u8(flags) + u32(buf_alloc) + u32(fwd) + u16(len(payload)) + payload

rx_bufs = u8(4) + u8(7) + u16(0x1000) * 8
REQ, RESP, RST, SHUT, RW, CREDIT_UPD, CREDIT_REQ = 1, 2, 3, 4, 5, 6, 7
host_write = lambda data: u8(7) + u8(0) + u8(2) + u16(len(data)) + data
put("vsock", "host-connect", rx_bufs + u8(6) + u8(0) + u8(0) + u8(10) + tx(RESP, 0) + u8(9) + host_write(b"hello")
    + u8(10) + tx(RW, 0, b"abc") + u8(9) + tx(CREDIT_UPD, 0) + tx(CREDIT_REQ, 0) + rx_bufs + u8(10)
    + tx(SHUT, 0, flags=3) + u8(10) + tx(RST, 0))
put("vsock", "guest-connect", rx_bufs + tx(REQ, 52) + u8(8) + tx(RW, 52, b"ping") + u8(9) + u8(7) + u8(0) + u8(2)
    + u16(4) + b"pong" + u8(10) + rx_bufs + u8(7) + u8(0) + u8(0) + u8(10) + tx(SHUT, 52, flags=1) + u8(7) + u8(0) + u8(1) + u8(10))
put("vsock", "bad-connect-lines", u8(6) + u8(1) + u8(9) + b"CONNECT x" + u8(6) + u8(1) + u8(12) + b"CONNECT 99\n\n" + rx_bufs + u8(10) + u8(10))
put("vsock", "no-rx-buffers", u8(6) + u8(0) + u8(1) + u8(10) + tx(RESP, 0, src=1) + host_write(b"x" * 300) + u8(10) + rx_bufs + u8(10))

# --- net: vmm/src/fuzzing/net.rs
hdr = bytes(12)
frame = lambda n: u8(0) + hdr + u16(n) + bytes((i * 7) % 251 for i in range(n)) + u16(12) + u16(0xFFFF)
rx = u8(4) + u8(3) + (u8(0) + u16(2048)) * 4
host = lambda n: u8(6) + u8(0) + u16(n) + bytes(n)
put("net", "tx-rx", u8(0) + frame(60) + frame(1500) + u8(7) + rx + host(60) + host(1514) + u8(8))
put("net", "mrg-event-idx", u8(3) + rx + host(3000) + u8(8) + frame(100) + u8(7))
put("net", "no-buffers", u8(1) + host(100) + host(200) + u8(8) + rx + u8(8))
put("net", "oversized-from-host", u8(0) + rx + u8(6) + u8(0xFF) + u8(8))

# --- agent_frame: guest-agent/protocol/src/fuzzing.rs
def frame_of(obj):
    b = json.dumps(obj).encode()
    return u32be(len(b)) + b

u32be = lambda v: struct.pack(">I", v)
put("agent_frame", "requests", b"".join(frame_of(o) for o in [
    {"op": "health"}, {"op": "wait", "id": "c1"}, {"op": "signal", "id": "c1", "signal": 15},
    {"op": "exec", "id": "p", "argv": ["sh", "-c", "true"], "env": ["A=b"], "cwd": "/", "stdin": True, "terminal": None},
    {"op": "resize_pty", "id": "p", "rows": 24, "cols": 80},
    {"op": "update_container", "id": "c", "resources": {"memory_max": {"value": 1024}, "pids_max": "max"}},
]))
put("agent_frame", "responses", b"".join(frame_of(o) for o in [
    {"result": "health", "protocol_version": 5, "agent_version": "0.1.0"}, {"result": "started", "pid": 7},
    {"result": "ok"}, {"result": "error", "message": "no", "code": "not_found"}, {"result": "pids", "pids": [1, 2]},
]))
put("agent_frame", "hello-and-batch", frame_of({"id": "p", "stream": "stdout"}) + frame_of(
    {"share": "s", "seq": 1, "first_change_unix_ns": 0, "resync": False,
     "records": [{"path": "a", "kind": "created"}, {"path": "b", "kind": "moved", "from": "a"}]}))
put("agent_frame", "oversized", u32be(0xFFFFFFFF) + b"{}")
put("agent_frame", "truncated", u32be(100) + b'{"op":')

# --- change_records: guest-agent/src/mirror/fuzzing.rs
NAMES = ["a", "d", "b", "..data", "..2026_01", "..2026_02", "key", "up", "abs", "x", "..data_tmp", "e"]
def path(*names):
    return u8(len(names) - 1) + b"".join(u8(NAMES.index(n)) for n in names)

def rec(kind, p, frm=None):
    # kind: 0 created 1 modified 2 removed 3 moved; a path from NAMES (selector 7)
    b = u8(kind) + u8(7) + p
    if kind == 3:
        b += u8(0) + u8(7) + frm if frm else u8(1)
    return b

def batch(records, share=4, resync=0):
    return u8(1) + u8(share) + u8(len(records)) + b"".join(records) + u8(1) + u8(resync)

change = lambda p, kind, extra=b"": u8(0) + p + u8(kind) + extra
apply = lambda *batches: u8(2) + u8(len(batches) - 1) + b"".join(b + u8(0) for b in batches)
put("change_records", "create-modify-remove", change(path("x"), 0, u8(0) if False else b"") + apply(batch([rec(0, path("x"))]))
    + change(path("d", "e"), 6) + apply(batch([rec(1, path("d", "e"))])) + change(path("x"), 3) + apply(batch([rec(2, path("x"))])))
put("change_records", "kubelet-swap", change(path("a"), 5) + apply(batch([rec(0, path("..2026_00")) if False else rec(3, path("..data"), path("..data_tmp"))]))
    + u8(4))
put("change_records", "rename", change(path("a"), 4, path("e")) + apply(batch([rec(3, path("e"), path("a"))])))
put("change_records", "symlink-out-then-write", change(path("x"), 2, u8(0)) + apply(batch([rec(0, path("x"))]))
    + change(path("e"), 1) + change(path("e", "b"), 0) + apply(batch([rec(0, path("e", "b")), rec(0, path("up", "b"))])))
put("change_records", "hostile-paths", apply(batch([u8(0) + u8(0), u8(0) + u8(1), u8(0) + u8(2) + path("a"), u8(0) + u8(4) + path("a"),
    u8(3) + u8(7) + path("a") + u8(0) + u8(0)])))
put("change_records", "other-share-and-huge", apply(batch([rec(0, path("x"))], share=0), batch([rec(0, path("a"))], share=1),
    u8(1) + u8(4) + u8(0xFF) + b"".join(rec(1, path("a")) for _ in range(16)) + u8(2) + u8(0)))
put("change_records", "raw-batch", u8(2) + u8(0) + u8(0) + u8(20) + json.dumps(
    {"share": "s", "seq": 3, "first_change_unix_ns": 1, "resync": True, "records": []}).encode().ljust(80) + u8(0))

# --- oci_spec: runtime/src/fuzzing.rs
spec = {
    "ociVersion": "1.0.2",
    "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["sh"], "env": ["PATH=/bin"], "cwd": "/",
                "apparmorProfile": "x", "capabilities": {"bounding": ["CAP_KILL"]}},
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "h",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
               {"destination": "/data", "type": "bind", "source": "/var/lib/x", "options": ["rbind"]},
               {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}],
    "hooks": {"prestart": [{"path": "/bin/true"}]},
    "linux": {"namespaces": [{"type": "pid"}, {"type": "user"}, {"type": "network", "path": "/proc/1/ns/net"},
                             {"type": "ipc", "path": "/proc/99/ns/ipc"}],
              "resources": {"memory": {"limit": 1048576}},
              "seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_ERRNO"}]}},
}
put("oci_spec", "full", b"\x02\x01\x01\x01" + json.dumps(spec).encode())
put("oci_spec", "minimal", b"\0\0\0\0" + json.dumps({"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}).encode())
put("oci_spec", "no-args", b"\0\0\0\1" + json.dumps({"ociVersion": "1.0.2", "process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}}).encode())
