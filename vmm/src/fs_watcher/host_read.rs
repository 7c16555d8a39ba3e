//! What a batch carries besides its records, read on the host just before it is sent (see
//! [`tern_change_records::Generation`] and [`ChangeBatch::entries`]): the kubelet `..data`
//! generations its records report as swapped, and the regular files and symlinks they name.
//! The agent uses them instead of reading the share over virtio-fs.
//!
//! Every path is resolved beneath the share's root with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`: a share whose directories a guest (or anyone) replaces with symlinks
//! between the event and the read cannot make the VMM read, and hand the guest, a file outside
//! the share. Whatever fails to resolve that way is simply not carried; the agent then reads
//! the share itself, as it does without this.
//!
//! A generation: the link is read, then the directory it names (every entry, file contents
//! included), then the link again; the generation counts only if both reads of the link agree.
//! Kubelet's atomic writer fills a new directory completely before the rename that publishes it
//! and removes a directory only after `..data` moved away from it, so a directory the link still
//! names after it was read was complete while it was read. Anything else (a link that moved
//! meanwhile, an entry that is neither file, directory nor symlink, a generation past the
//! limits) gives no generation.
//!
//! [`ChangeBatch::entries`]: tern_change_records::ChangeBatch::entries

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tern_change_records::{
    is_safe_relative_path, Generation, HostContent, HostEntry, MAX_GENERATION_BYTES, MAX_GENERATION_ENTRIES,
};

/// The name of kubelet's publishing link.
pub const DATA_LINK: &str = "..data";
/// How often the link may move while its directory is read before the generation is left to
/// the agent: the host reads a generation in microseconds, so one retry is almost always enough.
const READ_ATTEMPTS: usize = 3;

/// Does the share-relative `path` name a kubelet `..data` link?
pub fn is_data_link(path: &str) -> bool {
    path.rsplit('/').next() == Some(DATA_LINK)
}

/// A share's root, every path resolved beneath it without following any symlink.
pub struct ShareRoot(OwnedFd);

impl ShareRoot {
    pub fn open(root: &Path) -> Option<ShareRoot> {
        let path = CString::new(root.as_os_str().as_bytes()).ok()?;
        // SAFETY: `path` is a valid NUL-terminated string; the returned fd is checked and
        // owned by the `OwnedFd` below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Some(ShareRoot(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Open share-relative `path` with `flags` (`O_NOFOLLOW | O_CLOEXEC` added), resolved
    /// beneath the root with no symlink on the way.
    fn open_beneath(&self, path: &str, flags: i32) -> Option<OwnedFd> {
        if !is_safe_relative_path(path) {
            return None;
        }
        let c_path = CString::new(path).ok()?;
        // SAFETY: `open_how` is plain data; all-zero is its "no options" value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 reads `c_path` (NUL-terminated) and `how` (of the size passed); the
        // root fd stays open for the call; the result is checked before use.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.0.as_raw_fd(),
                c_path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just opened and nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The entry at `path` (a final symlink is read, not followed); regular files with their
    /// content, charged to `budget` (bytes left). `None` for anything that cannot be read
    /// beneath the root, special files, and files past the budget.
    pub fn entry(&self, path: &str, budget: &mut u64) -> Option<HostEntry> {
        let handle = File::from(self.open_beneath(path, libc::O_PATH)?);
        let meta = handle.metadata().ok()?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Some(HostEntry::from_metadata(path, &meta, HostContent::Dir));
        }
        if ft.is_symlink() {
            let target = read_link_fd(&handle)?;
            return Some(HostEntry::from_metadata(path, &meta, HostContent::Symlink(target)));
        }
        if !ft.is_file() {
            return None;
        }
        // The metadata comes from the opened file, so it describes the content read.
        let mut file = File::from(self.open_beneath(path, libc::O_RDONLY)?);
        let meta = file.metadata().ok()?;
        if meta.size() > *budget {
            return None;
        }
        let mut content = Vec::with_capacity(usize::try_from(meta.size()).ok()?);
        file.by_ref().take(meta.size() + 1).read_to_end(&mut content).ok()?;
        if content.len() as u64 != meta.size() {
            return None;
        }
        *budget -= meta.size();
        Some(HostEntry::from_metadata(path, &meta, HostContent::File(content)))
    }

    /// The names in directory `dir`, sorted.
    fn names(&self, dir: &str) -> Option<Vec<String>> {
        let fd = self.open_beneath(dir, libc::O_RDONLY | libc::O_DIRECTORY)?;
        // The directory is already resolved safely: listing it through its fd's /proc link
        // follows nothing else.
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .ok()?
            .map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .collect::<Option<_>>()?;
        names.sort();
        Some(names)
    }
}

/// The target of the symlink `handle` (an `O_PATH | O_NOFOLLOW` fd of it).
fn read_link_fd(handle: &File) -> Option<String> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat with an empty path reads the link `handle` refers to into `buf`, at
    // most `buf.len()` bytes; the result is checked.
    let n = unsafe { libc::readlinkat(handle.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let n = usize::try_from(n).ok().filter(|n| *n < buf.len())?;
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

/// The generation the `..data` link at share-relative `link` publishes, if it can be read
/// completely (module docs). `order` is stamped on it.
pub fn read_generation(root: &ShareRoot, link: &str, order: u64) -> Option<Generation> {
    if !is_data_link(link) {
        return None;
    }
    let mut link_entry = read_link(root, link)?;
    for _ in 0..READ_ATTEMPTS {
        let HostContent::Symlink(target) = &link_entry.content else {
            return None;
        };
        let dir = published_dir(link, target)?;
        let entries = read_dir_tree(root, &dir);
        let again = read_link(root, link)?;
        if again.content == link_entry.content {
            return entries.map(|entries| Generation { order, link: link_entry, entries, earlier: Vec::new() });
        }
        tracing::trace!(link, "..data moved while its generation was read; reading the newer one");
        link_entry = again;
    }
    None
}

/// The share-relative directory a link at `link` pointing to `target` names: a sibling
/// directory, never anything outside the link's own directory.
fn published_dir(link: &str, target: &str) -> Option<String> {
    if target.contains('/') || !is_safe_relative_path(target) {
        return None;
    }
    Some(match link.rsplit_once('/') {
        Some((parent, _)) => format!("{parent}/{target}"),
        None => target.to_owned(),
    })
}

fn read_link(root: &ShareRoot, link: &str) -> Option<HostEntry> {
    let mut no_budget = 0;
    root.entry(link, &mut no_budget).filter(|e| matches!(e.content, HostContent::Symlink(_)))
}

/// The directory `dir` and everything below it, parents first, within the generation limits.
fn read_dir_tree(root: &ShareRoot, dir: &str) -> Option<Vec<HostEntry>> {
    let mut budget = MAX_GENERATION_BYTES;
    let first = root.entry(dir, &mut budget).filter(|e| e.content == HostContent::Dir)?;
    let mut entries = vec![first];
    let mut next = 0;
    while next < entries.len() {
        if entries[next].content == HostContent::Dir {
            let parent = entries[next].path.clone();
            for name in root.names(&parent)? {
                entries.push(root.entry(&format!("{parent}/{name}"), &mut budget)?);
                if entries.len() > MAX_GENERATION_ENTRIES {
                    return None;
                }
            }
        }
        next += 1;
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn kubelet_layout(root: &Path, generation: &str, keys: &[(&str, &[u8])]) {
        let dir = root.join(generation);
        std::fs::create_dir(&dir).unwrap();
        for (name, value) in keys {
            std::fs::write(dir.join(name), value).unwrap();
        }
        symlink(generation, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    }

    #[test]
    fn a_published_generation_is_read_whole() {
        let root = tempfile::tempdir().unwrap();
        kubelet_layout(root.path(), "..2026_12_06_09_00_00.1", &[("password", b"p\0w"), ("username", b"admin")]);
        std::fs::create_dir(root.path().join("..2026_12_06_09_00_00.1/nested")).unwrap();
        std::fs::write(root.path().join("..2026_12_06_09_00_00.1/nested/k"), b"v").unwrap();
        let g = read_generation(&ShareRoot::open(root.path()).unwrap(), "..data", 7).unwrap();
        assert_eq!(g.order, 7);
        assert_eq!(g.link.content, HostContent::Symlink("..2026_12_06_09_00_00.1".into()));
        let paths: Vec<&str> = g.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "..2026_12_06_09_00_00.1",
                "..2026_12_06_09_00_00.1/nested",
                "..2026_12_06_09_00_00.1/password",
                "..2026_12_06_09_00_00.1/username",
                "..2026_12_06_09_00_00.1/nested/k",
            ]
        );
        assert_eq!(g.entries[2].content, HostContent::File(b"p\0w".to_vec()));
        assert_eq!(g.entries[2].size, 3);
        let meta = std::fs::symlink_metadata(root.path().join("..2026_12_06_09_00_00.1/username")).unwrap();
        assert_eq!((g.entries[3].ino, g.entries[3].mode), (meta.ino(), meta.mode() & 0o7777));
    }

    #[test]
    fn links_out_of_their_directory_and_oversized_generations_give_none() {
        let root = tempfile::tempdir().unwrap();
        assert!(read_generation(&ShareRoot::open(root.path()).unwrap(), "..data", 1).is_none(), "no link at all");
        symlink("../outside", root.path().join("..data")).unwrap();
        assert!(read_generation(&ShareRoot::open(root.path()).unwrap(), "..data", 1).is_none());
        std::fs::remove_file(root.path().join("..data")).unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        symlink("/etc", root.path().join("..data")).unwrap();
        assert!(read_generation(&ShareRoot::open(root.path()).unwrap(), "..data", 1).is_none());
        std::fs::remove_file(root.path().join("..data")).unwrap();
        assert!(read_generation(&ShareRoot::open(root.path()).unwrap(), "key", 1).is_none(), "not a ..data link");

        let big = vec![b'x'; (MAX_GENERATION_BYTES / 2 + 1) as usize];
        kubelet_layout(root.path(), "..big", &[("a", &big), ("b", &big)]);
        assert!(read_generation(&ShareRoot::open(root.path()).unwrap(), "..data", 1).is_none());
        std::fs::remove_file(root.path().join("..big/b")).unwrap();
        assert!(read_generation(&ShareRoot::open(root.path()).unwrap(), "..data", 1).is_some());
    }

    #[test]
    fn nothing_is_read_through_a_symlink_or_outside_the_root() {
        let base = tempfile::tempdir().unwrap();
        let (share, outside) = (base.path().join("share"), base.path().join("outside"));
        std::fs::create_dir_all(share.join("d")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host only").unwrap();
        std::fs::write(share.join("d/f"), b"shared").unwrap();
        symlink(&outside, share.join("abs")).unwrap();
        symlink("../outside", share.join("rel")).unwrap();
        symlink("../outside/secret", share.join("file-link")).unwrap();
        let root = ShareRoot::open(&share).unwrap();
        let mut budget = 1 << 20;
        let f = root.entry("d/f", &mut budget).unwrap();
        assert_eq!(f.content, HostContent::File(b"shared".to_vec()));
        assert_eq!(budget, (1 << 20) - 6);
        for escape in ["abs/secret", "rel/secret", "../outside/secret", "/etc/passwd", "d/../../outside/secret"] {
            assert!(root.entry(escape, &mut budget).is_none(), "{escape} was read");
        }
        // A symlink itself is carried as a link, never followed.
        let link = root.entry("file-link", &mut budget).unwrap();
        assert_eq!(link.content, HostContent::Symlink("../outside/secret".into()));
        // A directory swapped for a symlink after its event is not followed either.
        std::fs::remove_dir_all(share.join("d")).unwrap();
        symlink(&outside, share.join("d")).unwrap();
        assert!(root.entry("d/secret", &mut budget).is_none());
        // Past the budget: left out.
        std::fs::write(share.join("big"), vec![b'x'; 10]).unwrap();
        let mut small = 9;
        assert!(root.entry("big", &mut small).is_none());
        assert_eq!(small, 9);
    }

    #[test]
    fn a_link_in_a_subdirectory_names_its_sibling() {
        assert_eq!(published_dir("a/b/..data", "..2026").as_deref(), Some("a/b/..2026"));
        assert_eq!(published_dir("..data", "..2026").as_deref(), Some("..2026"));
        assert_eq!(published_dir("..data", "x/y"), None);
        assert_eq!(published_dir("..data", ".."), None);
    }
}
