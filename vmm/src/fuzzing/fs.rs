//! virtio-fs request chains through tern's chain checks into fuse-backend-rs's server, over a
//! passthrough share in a temp dir. Next to the share lie a directory the guest must never
//! reach (a file with a secret in it, and symlinks in the share pointing at both); after every
//! input nothing there may have been created, changed or removed, and the secret may appear
//! in no buffer the device wrote unless the guest put it into a share file itself.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::mem::size_of;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, OnceLock};

use fuse_backend_rs::abi::fuse_abi::{InHeader, InitIn};
use fuse_backend_rs::api::server::Server;
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{post_chain, zeroed_memory, Areas, Input};
use crate::devices::fs::event_handler::{FsHandler, HIPRIO_QUEUE, REQUEST_QUEUE};
use crate::devices::fs::{CachePolicy, FsShares, ShareConfig};
use crate::devices::virtio::test_ring::{CountingInterrupt, Ring};
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 0x10_0000;
const QSIZE: u16 = 256;
const REQ_RING: u64 = 0x0;
const HIPRIO_RING: u64 = 0x4000;
const IN_AREA: std::ops::Range<u64> = 0x1_0000..0x4_0000;
const OUT_AREA: std::ops::Range<u64> = 0x8_0000..0x10_0000;
/// Most requests in one input.
const MAX_REQUESTS: usize = 64;
/// Most bytes of one request's body.
const MAX_BODY: usize = 4096;

/// The secret outside the share: NUL bytes keep it out of any name or symlink target, the
/// random tail out of the fuzzer's reach.
fn secret() -> &'static [u8] {
    static SECRET: OnceLock<Vec<u8>> = OnceLock::new();
    SECRET.get_or_init(|| {
        use std::hash::{BuildHasher, RandomState};
        let mut s = b"tern\0fuzz\0outside\0secret\0".to_vec();
        s.extend_from_slice(&RandomState::new().hash_one(std::process::id()).to_le_bytes());
        s
    })
}

/// Name, size, mode and mtime of everything under `dir` (not following symlinks).
fn listing(dir: &Path) -> BTreeMap<OsString, (u64, u32, i64, i64)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let m = entry.path().symlink_metadata().unwrap();
        out.insert(entry.file_name(), (m.size(), m.mode(), m.mtime(), m.mtime_nsec()));
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a regular file below `dir` (the share) holds `needle`.
fn share_holds(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let Ok(m) = e.path().symlink_metadata() else { return false };
        if m.is_dir() {
            share_holds(&e.path(), needle)
        } else {
            m.is_file() && std::fs::read(e.path()).is_ok_and(|c| contains(&c, needle))
        }
    })
}

/// Post one FUSE request (header and `body`), split over one or two readable descriptors, with
/// one or two writable descriptors for the reply; the input may make the header's length lie.
fn request(
    input: &mut Input<'_>,
    mem: &GuestMemory,
    areas: &mut Areas,
    ring: &mut Ring,
    header: InHeader,
    body: &[u8],
) {
    let honest = (size_of::<InHeader>() + body.len()) as u32;
    let len = if input.u8() == 0xff { input.u32() } else { honest };
    let header = InHeader { len, ..header };
    let mut bytes = header.as_slice().to_vec();
    bytes.extend_from_slice(body);
    let split = usize::from(input.u16()) % (bytes.len() + 1);
    let mut bufs = Vec::new();
    for part in [&bytes[..split], &bytes[split..]] {
        if !part.is_empty() {
            let addr = Areas::take(&mut areas.next_readable, &areas.readable, part.len() as u64);
            mem.write_slice(part, GuestAddress(addr)).unwrap();
            bufs.push((addr, part.len() as u32, false));
        }
    }
    for _ in 0..1 + input.u8() % 2 {
        let cap = u64::from(input.u16()).max(16);
        let addr = Areas::take(&mut areas.next_writable, &areas.writable, cap);
        bufs.push((addr, cap as u32, true));
    }
    ring.post(&bufs);
}

/// Play `data` as FUSE requests on a fresh device and share.
pub fn run(data: &[u8]) {
    static MEM: OnceLock<&'static GuestMemory> = OnceLock::new();
    let mem = zeroed_memory(&MEM, MEM_SIZE);
    let base = tempfile::tempdir().unwrap();
    let share = base.path().join("share");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(share.join("file"), b"inside the share\n").unwrap();
    std::fs::write(outside.join("secret"), secret()).unwrap();
    symlink("../outside", share.join("up")).unwrap();
    symlink(outside.join("secret"), share.join("abs")).unwrap();
    symlink("../../outside/secret", share.join("dir/deep")).unwrap();
    let base_before = listing(base.path());
    let outside_before = listing(&outside);

    let mut ring = Ring::new(mem, REQ_RING, QSIZE);
    let mut hiprio = Ring::new(mem, HIPRIO_RING, QSIZE);
    let shares = Arc::new(FsShares::new());
    let read_only = data.first().is_some_and(|b| b & 0x80 != 0);
    let config =
        ShareConfig { name: "s0".into(), host_dir: share.clone(), read_only, cache: CachePolicy::Never, watch: false };
    shares.add(config).unwrap();
    let mut handler = FsHandler::new(
        mem.clone(),
        Arc::new(CountingInterrupt(AtomicUsize::new(0))),
        [hiprio.queue(false), ring.queue(false)],
        [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()],
        Arc::new(Server::new(shares.vfs())),
        Arc::new(AtomicBool::new(false)),
    );
    let mut areas = Areas::new(IN_AREA, OUT_AREA);
    let mut input = Input::new(data.get(1..).unwrap_or_default());
    let init = InitIn { major: 7, minor: 31, max_readahead: 0x20000, flags: input.u32() };
    let header = InHeader { opcode: 26, unique: 1, ..Default::default() };
    request(&mut Input::new(&[]), mem, &mut areas, &mut ring, header, init.as_slice());
    handler.process_queue(REQUEST_QUEUE);

    let mut served = 0;
    while !input.is_empty() && served < MAX_REQUESTS {
        served += 1;
        match input.u8() % 8 {
            // A well-framed request: opcode, node, body from the input.
            0..=5 => {
                let opcode = u32::from(input.u8());
                let nodeid = u64::from(input.u8());
                let body_len = usize::from(input.u16()) % (MAX_BODY + 1);
                let body = input.bytes(body_len).to_vec();
                let header = InHeader { opcode, nodeid, unique: served as u64 + 1, ..Default::default() };
                request(&mut input, mem, &mut areas, &mut ring, header, &body);
                handler.process_queue(REQUEST_QUEUE);
            }
            // A chain of raw descriptors.
            6 => {
                post_chain(&mut input, mem, &mut ring, &mut areas, 8);
                handler.process_queue(REQUEST_QUEUE);
            }
            _ => {
                post_chain(&mut input, mem, &mut hiprio, &mut areas, 4);
                handler.process_queue(HIPRIO_QUEUE);
            }
        }
        let used = ring.used().into_iter().chain(hiprio.used());
        for (_, len) in used {
            assert!(len as usize <= MEM_SIZE, "used length {len} beyond guest memory");
        }
    }

    let names = |l: &BTreeMap<OsString, _>| l.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&listing(base.path())), names(&base_before), "something next to the share was created or removed");
    assert_eq!(listing(&outside), outside_before, "something outside the share changed");
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), secret(), "the file outside the share changed");
    let mut written = vec![0u8; (OUT_AREA.end - OUT_AREA.start) as usize];
    mem.read_slice(&mut written, GuestAddress(OUT_AREA.start)).unwrap();
    if contains(&written, secret()) {
        assert!(share_holds(&share, secret()), "the device returned the secret from outside the share");
    }
}
