//! In-memory tests of the virtio-fs device: a simulated guest driver posts FUSE requests as
//! descriptor chains over a `GuestMemoryMmap`, an [`FsHandler`] serves them from shares on temp
//! dirs. No KVM, no threads. Hostile requests (malformed chains, lying headers, escapes) must
//! fail that request only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::mem::size_of;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, FsyncIn, GetattrIn, GetxattrIn, InHeader, InitIn, LinkIn, MkdirIn, MknodIn, Opcode,
    OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, SetxattrIn, WriteIn,
};
use fuse_backend_rs::api::server::Server;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::{FsHandler, MAX_CHAIN_DESCRIPTORS, REQUEST_QUEUE};
use super::*;
use crate::devices::virtio::test_ring::{CountingInterrupt, Ring};
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestMemory;

const QSIZE: u16 = 1024;
const MEM_SIZE: u64 = 0x400_0000;
const REQ_RING: u64 = 0x1_0000;
const HIPRIO_RING: u64 = 0x4_0000;
const IN_ADDR: u64 = 0x10_0000;
const OUT_ADDR: u64 = 0x20_0000;
const OUT_CAP: u32 = 0x2_0000;
const ROOT: u64 = 1;

/// A reply: its header and payload.
struct Reply {
    header: OutHeader,
    body: Vec<u8>,
}

impl Reply {
    fn errno(&self) -> i32 {
        -self.header.error
    }

    fn obj<T: ByteValued>(&self) -> T {
        assert_eq!(self.header.error, 0, "request failed with errno {}", self.errno());
        T::from_slice(&self.body[..size_of::<T>()]).copied().unwrap()
    }
}

/// A guest driver, an activated handler and the shares behind it.
struct Harness {
    mem: &'static GuestMemory,
    ring: Ring,
    handler: FsHandler,
    shares: Arc<FsShares>,
    next_unique: u64,
}

impl Harness {
    fn new() -> Self {
        let mem: &'static GuestMemory =
            Box::leak(Box::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()));
        let ring = Ring::new(mem, REQ_RING, QSIZE);
        let hiprio = Ring::new(mem, HIPRIO_RING, QSIZE);
        let shares = Arc::new(FsShares::new());
        let handler = FsHandler::new(
            mem.clone(),
            Arc::new(CountingInterrupt(AtomicUsize::new(0))),
            [hiprio.queue(false), ring.queue(false)],
            [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            Arc::new(Server::new(shares.vfs())),
            Arc::new(AtomicBool::new(false)),
        );
        Harness { mem, ring, handler, shares, next_unique: 1 }
    }

    fn add_share(&self, name: &str, dir: &Path, read_only: bool) {
        let share = ShareConfig {
            name: name.into(),
            host_dir: dir.to_path_buf(),
            read_only,
            cache: CachePolicy::Never,
            watch: false,
        };
        self.shares.add(share).unwrap();
    }

    /// Post raw chain buffers, serve them, return the used length.
    fn raw(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        let head = self.ring.post(bufs);
        assert!(self.handler.process_queue(REQUEST_QUEUE));
        let used = self.ring.used();
        assert_eq!(used.len(), 1, "every chain goes back exactly once");
        assert_eq!(used[0].0, head);
        used[0].1
    }

    fn read_reply(&self, used_len: u32) -> Option<Reply> {
        if used_len == 0 {
            return None;
        }
        let header: OutHeader = self.mem.read_obj(GuestAddress(OUT_ADDR)).unwrap();
        assert!(used_len as usize >= size_of::<OutHeader>());
        let mut body = vec![0u8; used_len as usize - size_of::<OutHeader>()];
        self.mem.read_slice(&mut body, GuestAddress(OUT_ADDR + size_of::<OutHeader>() as u64)).unwrap();
        Some(Reply { header, body })
    }

    /// Send one well-formed request and return its reply.
    fn call(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Reply {
        self.call_maybe(opcode, nodeid, body).expect("a reply")
    }

    /// Send one request; `None` if the server had no reply for it (e.g. undecodable).
    fn call_maybe(&mut self, opcode: Opcode, nodeid: u64, body: &[u8]) -> Option<Reply> {
        let unique = self.next_unique;
        self.next_unique += 1;
        let len = (size_of::<InHeader>() + body.len()) as u32;
        let header = InHeader { len, opcode: opcode as u32, unique, nodeid, ..Default::default() };
        self.mem.write_slice(header.as_slice(), GuestAddress(IN_ADDR)).unwrap();
        self.mem.write_slice(body, GuestAddress(IN_ADDR + size_of::<InHeader>() as u64)).unwrap();
        let used = self.raw(&[(IN_ADDR, len, false), (OUT_ADDR, OUT_CAP, true)]);
        let reply = self.read_reply(used)?;
        assert_eq!(reply.header.unique, unique);
        Some(reply)
    }

    fn init(&mut self) {
        let init = InitIn { major: 7, minor: 31, max_readahead: 0x20000, flags: 0 };
        let reply = self.call(Opcode::Init, 0, init.as_slice());
        assert_eq!(reply.header.error, 0);
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let name = CString::new(name).unwrap();
        let reply = self.call(Opcode::Lookup, parent, name.as_bytes_with_nul());
        if reply.header.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.obj())
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let open = OpenIn { flags: flags as u32, fuse_flags: 0 };
        let reply = self.call(Opcode::Open, node, open.as_slice());
        if reply.header.error != 0 {
            return Err(reply.errno());
        }
        Ok(reply.obj::<OpenOut>().fh)
    }

    fn read(&mut self, node: u64, fh: u64, size: u32) -> Vec<u8> {
        let read = ReadIn { fh, offset: 0, size, ..Default::default() };
        let reply = self.call(Opcode::Read, node, read.as_slice());
        assert_eq!(reply.header.error, 0, "read failed: {}", reply.errno());
        reply.body
    }

    /// CREATE `name` in `parent` (read-write) and WRITE `data` at offset 0; both must succeed.
    fn create_and_write(&mut self, parent: u64, name: &str, data: &[u8]) -> (EntryOut, OpenOut) {
        let create = CreateIn { flags: (libc::O_CREAT | libc::O_RDWR) as u32, mode: 0o644, ..Default::default() };
        let reply = self.named(Opcode::Create, parent, create, name);
        assert_eq!(reply.header.error, 0);
        let entry: EntryOut = reply.obj();
        let open: OpenOut =
            OpenOut::from_slice(&reply.body[size_of::<EntryOut>()..][..size_of::<OpenOut>()]).copied().unwrap();
        let size = u32::try_from(data.len()).unwrap();
        let mut write = WriteIn { fh: open.fh, offset: 0, size, ..Default::default() }.as_slice().to_vec();
        write.extend_from_slice(data);
        assert_eq!(self.call(Opcode::Write, entry.nodeid, &write).header.error, 0);
        (entry, open)
    }

    fn named<T: ByteValued>(&mut self, opcode: Opcode, parent: u64, arg: T, name: &str) -> Reply {
        let mut body = arg.as_slice().to_vec();
        body.extend_from_slice(CString::new(name).unwrap().as_bytes_with_nul());
        self.call(opcode, parent, &body)
    }
}

fn share_with_file() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello from the host\n").unwrap();
    dir
}

#[test]
fn config_space_has_tag_and_one_request_queue() {
    let lp = crate::devices::event_loop::EventLoop::new().unwrap();
    let dev = VirtioFs::new(FS_TAG, Arc::new(FsShares::new()), lp.handle()).unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let mut config = [0xffu8; 40];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..4], b"tern");
    assert!(config[4..36].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes(config[36..40].try_into().unwrap()), 1);
    let mut past = [0xffu8; 4];
    dev.read_config(64, &mut past);
    assert_eq!(past, [0; 4]);
    assert!(VirtioFs::new(&"x".repeat(37), Arc::new(FsShares::new()), lp.handle()).is_err());
}

#[test]
fn init_lookup_getattr_read() {
    let dir = share_with_file();
    let mut h = Harness::new();
    h.add_share("s0", dir.path(), false);
    h.init();
    let s0 = h.lookup(ROOT, "s0").unwrap();
    let file = h.lookup(s0.nodeid, "hello.txt").unwrap();
    assert_eq!(file.attr.size, 20);
    let attr: AttrOut = h.call(Opcode::Getattr, file.nodeid, GetattrIn::default().as_slice()).obj();
    assert_eq!(attr.attr.size, 20);
    assert_eq!(attr.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let fh = h.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(h.read(file.nodeid, fh, 4096), b"hello from the host\n");
    // A read larger than the reply buffer fails that request, nothing else.
    let huge = ReadIn { fh, offset: 0, size: u32::MAX, ..Default::default() };
    let reply = h.call(Opcode::Read, file.nodeid, huge.as_slice());
    assert!(reply.header.error != 0 || reply.body.len() <= OUT_CAP as usize);
    assert_eq!(h.read(file.nodeid, fh, 4096), b"hello from the host\n");
    assert_eq!(h.lookup(s0.nodeid, "missing").unwrap_err(), libc::ENOENT);
}

#[test]
fn dotdot_at_the_share_root_stays_in_the_share() {
    let dir = share_with_file();
    let mut h = Harness::new();
    h.add_share("s0", dir.path(), false);
    h.init();
    let s0 = h.lookup(ROOT, "s0").unwrap();
    let up = h.lookup(s0.nodeid, "..").unwrap();
    assert_eq!(up.nodeid, s0.nodeid, ".. of the share root is the share root");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let sub = h.lookup(s0.nodeid, "sub").unwrap();
    assert_eq!(h.lookup(sub.nodeid, "..").unwrap().nodeid, s0.nodeid);
    let up_up = h.lookup(up.nodeid, "..").unwrap();
    assert_eq!(up_up.nodeid, s0.nodeid);
    // Names that are paths are refused outright.
    for name in ["../hello.txt", "a/b", "/etc"] {
        assert_eq!(h.lookup(s0.nodeid, name).unwrap_err(), libc::EINVAL, "{name}");
    }
}

#[test]
fn host_symlinks_are_data_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"HOST-ONLY-MARKER").unwrap();
    let dir = share_with_file();
    symlink(outside.path().join("secret"), dir.path().join("to-file")).unwrap();
    symlink(outside.path(), dir.path().join("to-dir")).unwrap();
    let mut h = Harness::new();
    h.add_share("s0", dir.path(), false);
    h.init();
    let s0 = h.lookup(ROOT, "s0").unwrap();

    let link = h.lookup(s0.nodeid, "to-file").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    let target = h.call(Opcode::Readlink, link.nodeid, &[]);
    assert_eq!(target.body, outside.path().join("secret").as_os_str().as_encoded_bytes());
    // Opening the link inode itself (the kernel never does; a hostile guest may).
    assert!(h.open(link.nodeid, libc::O_RDONLY).is_err());

    // Using a link to a host directory as a directory.
    let dir_link = h.lookup(s0.nodeid, "to-dir").unwrap();
    assert!(h.lookup(dir_link.nodeid, "secret").is_err());
    let reply = h.named(
        Opcode::Create,
        dir_link.nodeid,
        CreateIn { flags: libc::O_RDWR as u32, mode: 0o644, ..Default::default() },
        "planted",
    );
    assert_ne!(reply.header.error, 0);
    assert!(!outside.path().join("planted").exists());
    assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"HOST-ONLY-MARKER");
}

#[test]
fn read_only_share_refuses_every_change_with_erofs() {
    let dir = share_with_file();
    let mut h = Harness::new();
    h.add_share("ro", dir.path(), true);
    h.init();
    let ro = h.lookup(ROOT, "ro").unwrap();
    let file = h.lookup(ro.nodeid, "hello.txt").unwrap();

    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC, libc::O_WRONLY | libc::O_APPEND] {
        assert_eq!(h.open(file.nodeid, flags).unwrap_err(), libc::EROFS, "flags {flags:#o}");
    }
    let fh = h.open(file.nodeid, libc::O_RDONLY).unwrap();
    let mut write = WriteIn { fh, offset: 0, size: 3, ..Default::default() }.as_slice().to_vec();
    write.extend_from_slice(b"bad");
    assert_eq!(h.call(Opcode::Write, file.nodeid, &write).errno(), libc::EROFS);

    let create = CreateIn { flags: (libc::O_CREAT | libc::O_WRONLY) as u32, mode: 0o644, ..Default::default() };
    assert_eq!(h.named(Opcode::Create, ro.nodeid, create, "new").errno(), libc::EROFS);
    assert_eq!(h.named(Opcode::Mkdir, ro.nodeid, MkdirIn { mode: 0o755, umask: 0 }, "d").errno(), libc::EROFS);
    let unlink = CString::new("hello.txt").unwrap();
    assert_eq!(h.call(Opcode::Unlink, ro.nodeid, unlink.as_bytes_with_nul()).errno(), libc::EROFS);
    let setattr = SetattrIn { valid: 1, mode: 0o777, ..Default::default() };
    assert_eq!(h.call(Opcode::Setattr, file.nodeid, setattr.as_slice()).errno(), libc::EROFS);
    let setattr = SetattrIn { valid: 8, size: 0, ..Default::default() };
    assert_eq!(h.call(Opcode::Setattr, file.nodeid, setattr.as_slice()).errno(), libc::EROFS);

    assert_eq!(std::fs::read(dir.path().join("hello.txt")).unwrap(), b"hello from the host\n");
    assert!(!dir.path().join("new").exists() && !dir.path().join("d").exists());
}

#[test]
fn writable_share_writes_but_refuses_device_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new();
    h.add_share("rw", dir.path(), false);
    h.init();
    let rw = h.lookup(ROOT, "rw").unwrap();
    h.create_and_write(rw.nodeid, "out.txt", b"guest");
    assert_eq!(std::fs::read(dir.path().join("out.txt")).unwrap(), b"guest");

    for mode in [libc::S_IFCHR | 0o600, libc::S_IFBLK | 0o600] {
        let mknod = MknodIn { mode, rdev: 0x0801, umask: 0, padding: 0 };
        assert_eq!(h.named(Opcode::Mknod, rw.nodeid, mknod, "dev").errno(), libc::EPERM);
    }
    assert!(!dir.path().join("dev").exists());
    let mknod = MknodIn { mode: libc::S_IFIFO | 0o600, rdev: 0, umask: 0, padding: 0 };
    assert_eq!(h.named(Opcode::Mknod, rw.nodeid, mknod, "fifo").header.error, 0);
}

#[test]
fn malformed_chains_fail_that_request_only() {
    let dir = share_with_file();
    let mut h = Harness::new();
    h.add_share("s0", dir.path(), false);
    h.init();

    // Shorter than a FUSE header: returned unused.
    h.mem.write_slice(&[0u8; 8], GuestAddress(IN_ADDR)).unwrap();
    assert_eq!(h.raw(&[(IN_ADDR, 8, false), (OUT_ADDR, OUT_CAP, true)]), 0);
    // No readable part at all.
    assert_eq!(h.raw(&[(OUT_ADDR, OUT_CAP, true)]), 0);
    // No writable part: nowhere to reply, still returned.
    let header = InHeader { len: 40, opcode: Opcode::Getattr as u32, unique: 77, nodeid: ROOT, ..Default::default() };
    h.mem.write_slice(header.as_slice(), GuestAddress(IN_ADDR)).unwrap();
    assert_eq!(h.raw(&[(IN_ADDR, 40, false)]), 0);

    // A header claiming more bytes than the chain holds, or fewer than itself: EINVAL.
    for len in [41, u32::MAX, 0, 39] {
        let header = InHeader { len, opcode: Opcode::Lookup as u32, unique: 99, nodeid: ROOT, ..Default::default() };
        h.mem.write_slice(header.as_slice(), GuestAddress(IN_ADDR)).unwrap();
        let used = h.raw(&[(IN_ADDR, 40, false), (OUT_ADDR, OUT_CAP, true)]);
        let reply = h.read_reply(used).unwrap();
        assert_eq!((reply.header.unique, reply.errno()), (99, libc::EINVAL), "len {len}");
    }

    // A buffer outside guest memory.
    assert_eq!(h.raw(&[(MEM_SIZE - 16, 64, false), (OUT_ADDR, OUT_CAP, true)]), 0);
    // More readable bytes than any request may have.
    assert_eq!(h.raw(&[(IN_ADDR, 0x20_0000, false), (OUT_ADDR, OUT_CAP, true)]), 0);
    // A chain with too many descriptors.
    let many: Vec<_> = (0..=MAX_CHAIN_DESCRIPTORS as u64).map(|i| (IN_ADDR + i * 64, 64, false)).collect();
    assert_eq!(h.raw(&many), 0);
    // Unknown opcode: an error reply, not a crash.
    assert_eq!(h.call(Opcode::Lookup, ROOT, b"s0\0").header.error, 0);
    let header = InHeader { len: 40, opcode: 9999, unique: 5, nodeid: ROOT, ..Default::default() };
    h.mem.write_slice(header.as_slice(), GuestAddress(IN_ADDR)).unwrap();
    let used = h.raw(&[(IN_ADDR, 40, false), (OUT_ADDR, OUT_CAP, true)]);
    assert_eq!(h.read_reply(used).unwrap().errno(), libc::ENOSYS);
    // A truncated body (LOOKUP name without NUL, READ without ReadIn).
    assert!(h.call_maybe(Opcode::Lookup, ROOT, b"s0").is_none_or(|r| r.header.error != 0));
    let used = {
        let header = InHeader { len: 44, opcode: Opcode::Read as u32, unique: 6, nodeid: ROOT, ..Default::default() };
        h.mem.write_slice(header.as_slice(), GuestAddress(IN_ADDR)).unwrap();
        h.raw(&[(IN_ADDR, 44, false), (OUT_ADDR, OUT_CAP, true)])
    };
    assert!(used == 0 || h.read_reply(used).unwrap().header.error != 0);

    // The device still serves well-formed requests.
    let s0 = h.lookup(ROOT, "s0").unwrap();
    let file = h.lookup(s0.nodeid, "hello.txt").unwrap();
    let fh = h.open(file.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(h.read(file.nodeid, fh, 64), b"hello from the host\n");
}

#[test]
fn shares_come_and_go_on_a_running_device() {
    let a = share_with_file();
    let b = tempfile::tempdir().unwrap();
    std::fs::write(b.path().join("b.txt"), b"b").unwrap();
    let mut h = Harness::new();
    h.add_share("a", a.path(), false);
    h.init();
    assert!(h.lookup(ROOT, "b").is_err());

    // Added after INIT: visible on the next lookup.
    h.add_share("b", b.path(), true);
    let bn = h.lookup(ROOT, "b").unwrap();
    assert!(h.lookup(bn.nodeid, "b.txt").is_ok());
    let dup = ShareConfig {
        name: "b".into(),
        host_dir: b.path().into(),
        read_only: false,
        cache: CachePolicy::Auto,
        watch: false,
    };
    assert!(matches!(h.shares.add(dup), Err(ShareError::Duplicate(_))));
    assert_eq!(h.shares.list().len(), 2);

    // Removed: its inodes fail, the other share is untouched.
    let old = h.lookup(bn.nodeid, "b.txt").unwrap();
    h.shares.remove("b").unwrap();
    assert!(h.call(Opcode::Getattr, old.nodeid, GetattrIn::default().as_slice()).header.error != 0);
    assert!(matches!(h.shares.remove("b"), Err(ShareError::Unknown(_))));
    assert!(matches!(h.shares.remove("../x"), Err(ShareError::InvalidName(_))));
    let an = h.lookup(ROOT, "a").unwrap();
    assert!(h.lookup(an.nodeid, "hello.txt").is_ok());

    // The name can be used again.
    h.add_share("b", b.path(), false);
    let bn = h.lookup(ROOT, "b").unwrap();
    assert!(h.lookup(bn.nodeid, "b.txt").is_ok());

    let missing = ShareConfig {
        name: "c".into(),
        host_dir: a.path().join("nope"),
        read_only: false,
        cache: CachePolicy::Auto,
        watch: false,
    };
    assert!(matches!(h.shares.add(missing), Err(ShareError::HostDirMissing { .. })));
}

/// The fs thread's allowlist under real passthrough work: every request below is served on a
/// thread hardened as `tern-fs` is (trap mode), and none may break the filter. The share is
/// added outside it, as the runtime adds shares from its own threads.
#[test]
fn passthrough_requests_stay_inside_the_fs_filter() {
    let dir = share_with_file();
    let h = Harness::new();
    h.add_share("rw", dir.path(), false);
    /// The harness moves, whole, to the thread that serves it.
    struct Moved(Harness);
    // SAFETY: the harness's raw pointers point into its leaked ('static) guest memory; after
    // the move only the receiving thread touches the harness.
    unsafe impl Send for Moved {}
    impl Moved {
        fn into_inner(self) -> Harness {
            self.0
        }
    }
    let moved = Moved(h);
    let hardening = crate::seccomp::Hardening::trap_for_test();
    let thread = crate::seccomp::spawn("test-fs".into(), crate::seccomp::SeccompRole::Fs, &hardening, move || {
        let mut h = moved.into_inner();
        h.init();
        let rw = h.lookup(ROOT, "rw").unwrap();
        let file = h.lookup(rw.nodeid, "hello.txt").unwrap();
        let fh = h.open(file.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(h.read(file.nodeid, fh, 64), b"hello from the host\n");
        assert_eq!(h.call(Opcode::Getattr, file.nodeid, GetattrIn::default().as_slice()).header.error, 0);

        let (entry, open) = h.create_and_write(rw.nodeid, "out.txt", b"guest");
        let fsync = FsyncIn { fh: open.fh, ..Default::default() };
        assert_eq!(h.call(Opcode::Fsync, entry.nodeid, fsync.as_slice()).header.error, 0);
        for setattr in [
            SetattrIn { valid: 1, mode: 0o600, ..Default::default() },
            SetattrIn { valid: 8, size: 3, ..Default::default() },
            SetattrIn { valid: 16 | 32, atime: 1, mtime: 2, ..Default::default() },
        ] {
            assert_eq!(h.call(Opcode::Setattr, entry.nodeid, setattr.as_slice()).header.error, 0);
        }
        let release = ReleaseIn { fh: open.fh, ..Default::default() };
        h.call_maybe(Opcode::Release, entry.nodeid, release.as_slice());

        assert_eq!(h.named(Opcode::Mkdir, rw.nodeid, MkdirIn { mode: 0o755, umask: 0 }, "d").header.error, 0);
        let fifo = MknodIn { mode: libc::S_IFIFO | 0o600, rdev: 0, umask: 0, padding: 0 };
        assert_eq!(h.named(Opcode::Mknod, rw.nodeid, fifo, "fifo").header.error, 0);
        let mut symlink_body = b"link\0".to_vec();
        symlink_body.extend_from_slice(b"out.txt\0");
        assert_eq!(h.call(Opcode::Symlink, rw.nodeid, &symlink_body).header.error, 0);
        let link = h.lookup(rw.nodeid, "link").unwrap();
        assert_eq!(h.call(Opcode::Readlink, link.nodeid, &[]).body, b"out.txt");
        let mut rename = RenameIn { newdir: rw.nodeid }.as_slice().to_vec();
        rename.extend_from_slice(b"out.txt\0moved.txt\0");
        assert_eq!(h.call(Opcode::Rename, rw.nodeid, &rename).header.error, 0);
        let mut link_body = LinkIn { oldnodeid: entry.nodeid }.as_slice().to_vec();
        link_body.extend_from_slice(b"hard.txt\0");
        assert_eq!(h.call(Opcode::Link, rw.nodeid, &link_body).header.error, 0);

        let dh = {
            let reply = h.call(Opcode::Opendir, rw.nodeid, OpenIn::default().as_slice());
            assert_eq!(reply.header.error, 0);
            reply.obj::<OpenOut>().fh
        };
        let readdir = ReadIn { fh: dh, offset: 0, size: 4096, ..Default::default() };
        assert!(!h.call(Opcode::Readdir, rw.nodeid, readdir.as_slice()).body.is_empty());
        assert_eq!(h.call(Opcode::Statfs, rw.nodeid, &[]).header.error, 0);
        // xattrs: whether /tmp's file system takes user.* is not the point; the calls are.
        let mut setxattr = SetxattrIn { size: 1, flags: 0 }.as_slice().to_vec();
        setxattr.extend_from_slice(b"user.tern\0v");
        h.call(Opcode::Setxattr, file.nodeid, &setxattr);
        h.call(
            Opcode::Getxattr,
            file.nodeid,
            &[GetxattrIn { size: 64, padding: 0 }.as_slice(), b"user.tern\0"].concat(),
        );
        h.call(Opcode::Listxattr, file.nodeid, GetxattrIn { size: 64, padding: 0 }.as_slice());
        h.call(Opcode::Removexattr, file.nodeid, b"user.tern\0");

        for name in ["moved.txt", "hard.txt", "link", "fifo"] {
            let name = CString::new(name).unwrap();
            assert_eq!(h.call(Opcode::Unlink, rw.nodeid, name.as_bytes_with_nul()).header.error, 0, "{name:?}");
        }
        assert_eq!(h.call(Opcode::Rmdir, rw.nodeid, b"d\0").header.error, 0);
    })
    .unwrap();
    thread.join().unwrap();
    hardening.assert_no_violation();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only hello.txt is left");
}
