//! In-memory tests of the vhost-user-fs backend: a simulated guest driver posts FUSE requests
//! on a split queue over a `GuestMemoryMmap`, and [`process_queue`] serves them from a
//! passthrough file system on a temp dir. No vhost-user socket, no KVM.

use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn, OutHeader};
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use super::*;

const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x1_0000;
const MEM_SIZE: usize = 1 << 20;
const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const ROOT: u64 = 1;

/// A guest driver's side of one split queue.
struct Driver {
    mem: GuestMemoryMmap<()>,
    next_desc: u16,
    avail_idx: u16,
    next_buf: u64,
}

impl Driver {
    fn new(mem: GuestMemoryMmap<()>) -> Self {
        Driver { mem, next_desc: 0, avail_idx: 0, next_buf: BUFS }
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (len as u64 + 0xfff) & !0xfff;
        addr
    }

    /// Post a chain of (addr, len, device-writable) descriptors; returns the head index.
    fn post_raw(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let base = GuestAddress(DESC + 16 * u64::from(idx));
            self.mem.write_obj(addr, base).unwrap();
            self.mem.write_obj(len, base.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, base.unchecked_add(12)).unwrap();
            self.mem.write_obj((idx + 1) % QSIZE, base.unchecked_add(14)).unwrap();
        }
        self.next_desc = (head + bufs.len() as u16) % QSIZE;
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        head
    }

    /// Post a request (readable bytes) with a `reply_len`-byte writable buffer; returns the
    /// head index and the reply buffer's address.
    fn post_request(&mut self, request: &[u8], reply_len: u32) -> (u16, u64) {
        let req = self.alloc(request.len());
        self.mem.write_slice(request, GuestAddress(req)).unwrap();
        let reply = self.alloc(reply_len as usize);
        let head = self.post_raw(&[(req, request.len() as u32, false), (reply, reply_len, true)]);
        (head, reply)
    }

    /// The used ring's entries so far: (descriptor head, bytes written).
    fn used(&self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = GuestAddress(USED + 4 + 8 * u64::from(i % QSIZE));
                let id: u32 = self.mem.read_obj(at).unwrap();
                let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    fn reply_header(&self, reply: u64) -> OutHeader {
        self.mem.read_obj(GuestAddress(reply)).unwrap()
    }
}

fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let header =
        InHeader { len: (size_of::<InHeader>() + body.len()) as u32, opcode, unique, nodeid, ..Default::default() };
    let mut bytes = header.as_slice().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

fn init_request(unique: u64) -> Vec<u8> {
    let init = InitIn { major: 7, minor: 31, max_readahead: 0x2_0000, flags: 0 };
    fuse_request(FUSE_INIT, unique, 0, init.as_slice())
}

fn lookup_request(unique: u64, name: &str) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    fuse_request(FUSE_LOOKUP, unique, ROOT, &body)
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server<Arc<Vfs>>,
    shared: SharedMemory,
    vring: VringRwLock,
    driver: Driver,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello").unwrap();
    let vfs = Vfs::new(VfsOptions::default());
    let fs = PassthroughFs::<()>::new(Config {
        root_dir: dir.path().to_str().unwrap().to_string(),
        do_import: true,
        ..Default::default()
    })
    .unwrap();
    fs.import().unwrap();
    vfs.mount(Box::new(fs), "/").unwrap();

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let shared = GuestMemoryAtomic::new(mem.clone());
    let vring = VringRwLock::new(shared.clone(), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_info(DESC, AVAIL, USED).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    Fixture { _dir: dir, server: Server::new(Arc::new(vfs)), shared, vring, driver: Driver::new(mem) }
}

impl Fixture {
    fn process(&self) -> usize {
        process_queue(&self.server, &self.shared, &self.vring).unwrap()
    }
}

#[test]
fn init_and_lookup_are_answered() {
    let mut f = fixture();
    let (init, init_reply) = f.driver.post_request(&init_request(1), 4096);
    let (lookup, lookup_reply) = f.driver.post_request(&lookup_request(2, "hello.txt"), 4096);
    let (missing, missing_reply) = f.driver.post_request(&lookup_request(3, "nope"), 4096);
    assert_eq!(f.process(), 3);

    let used = f.driver.used();
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), vec![init, lookup, missing]);
    for (&(_, len), reply, unique) in [(&used[0], init_reply, 1), (&used[1], lookup_reply, 2)] {
        let header = f.driver.reply_header(reply);
        assert_eq!(header.error, 0, "request {unique}");
        assert_eq!(header.unique, unique);
        assert_eq!(header.len, len, "reply length matches the used length");
    }
    let header = f.driver.reply_header(missing_reply);
    assert_eq!(header.error, -libc::ENOENT);
}

#[test]
fn malformed_chains_fail_only_their_request() {
    let mut f = fixture();
    f.driver.post_request(&init_request(1), 4096);
    // A chain whose buffer lies outside guest memory.
    let outside = f.driver.post_raw(&[(1 << 40, 64, false), (BUFS, 4096, true)]);
    // A header cut short.
    let short = f.driver.post_request(&init_request(3)[..8], 4096).0;
    // No readable descriptor at all.
    let buf = f.driver.alloc(4096);
    let write_only = f.driver.post_raw(&[(buf, 4096, true)]);
    // A header claiming a length far beyond what fuse-backend-rs accepts.
    let mut huge = lookup_request(5, "hello.txt");
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let huge = f.driver.post_request(&huge, 4096).0;
    // ...and a good request after them all.
    let (good, good_reply) = f.driver.post_request(&lookup_request(6, "hello.txt"), 4096);
    assert_eq!(f.process(), 6);

    let used = f.driver.used();
    let len_of = |head: u16| used.iter().find(|u| u.0 == head).map(|u| u.1);
    assert_eq!(len_of(outside), Some(0));
    assert_eq!(len_of(short), Some(0));
    assert_eq!(len_of(write_only), Some(0));
    assert!(len_of(huge).is_some(), "an oversized request still completes");
    assert!(len_of(good).unwrap() > 0);
    assert_eq!(f.driver.reply_header(good_reply).error, 0);
}

#[test]
fn events_for_unknown_queues_are_errors_not_panics() {
    let f = fixture();
    let mut backend = VhostUserFsBackend::new(Arc::new(Vfs::new(VfsOptions::default())), "t").unwrap();
    let vrings = [f.vring.clone()];
    assert!(backend.handle_event(7, EventSet::IN, &vrings, 0).is_err());
    // Before SET_MEM_TABLE a kick is ignored.
    assert!(backend.handle_event(0, EventSet::IN, &vrings, 0).is_ok());
    backend.update_memory(f.shared.clone()).unwrap();
    assert!(backend.handle_event(0, EventSet::IN, &vrings, 0).is_ok());
}

#[test]
fn config_space_holds_tag_and_queue_count() {
    let backend = VhostUserFsBackend::new(Arc::new(Vfs::new(VfsOptions::default())), "myfs").unwrap();
    let config = backend.get_config(0, CONFIG_LEN as u32);
    assert_eq!(&config[..4], b"myfs");
    assert!(config[4..TAG_LEN].iter().all(|b| *b == 0));
    assert_eq!(&config[TAG_LEN..], &1u32.to_le_bytes());
    assert_eq!(backend.get_config(TAG_LEN as u32, 4), 1u32.to_le_bytes().to_vec());
    assert!(backend.get_config(30, 20).is_empty());
    assert!(backend.get_config(u32::MAX, u32::MAX).is_empty());
    assert_eq!(backend.num_queues(), 2);
    assert_ne!(backend.features() & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(backend.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
}

#[test]
fn tags_are_checked() {
    let vfs = || Arc::new(Vfs::new(VfsOptions::default()));
    assert!(VhostUserFsBackend::new(vfs(), "").is_err());
    assert!(VhostUserFsBackend::new(vfs(), &"x".repeat(TAG_LEN + 1)).is_err());
    assert!(VhostUserFsBackend::new(vfs(), &"x".repeat(TAG_LEN)).is_ok());
}
