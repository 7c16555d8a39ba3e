//! Reading a kubelet `..data` generation on the host, for the batch that reports its swap (see
//! [`tern_change_records::Generation`]).
//!
//! The link is read, then the directory it names (every entry, file contents included), then
//! the link again; the generation counts only if both reads of the link agree. Kubelet's atomic
//! writer fills a new directory completely before the rename that publishes it and removes a
//! directory only after `..data` moved away from it, so a directory the link still names after
//! it was read was complete while it was read. Anything else (a link that moved meanwhile, an
//! entry that is neither file, directory nor symlink, a generation past the limits) gives no
//! generation: the agent then reads the share itself, as it does without one.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use tern_change_records::{
    is_safe_relative_path, Generation, GenerationContent, GenerationEntry, MAX_GENERATION_BYTES, MAX_GENERATION_ENTRIES,
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

/// The generation the `..data` link at share-relative `link` of the share at `root` publishes,
/// if it can be read completely (module docs). `order` is stamped on it.
pub fn read_generation(root: &Path, link: &str, order: u64) -> Option<Generation> {
    if !is_safe_relative_path(link) || !is_data_link(link) {
        return None;
    }
    let mut link_entry = read_link(root, link)?;
    for _ in 0..READ_ATTEMPTS {
        let GenerationContent::Symlink(target) = &link_entry.content else {
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

fn entry_of(path: &str, meta: &std::fs::Metadata, content: GenerationContent) -> GenerationEntry {
    GenerationEntry {
        path: path.to_owned(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        ino: meta.ino(),
        size: meta.size(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
        content,
    }
}

fn read_link(root: &Path, link: &str) -> Option<GenerationEntry> {
    let path = root.join(link);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    let target = std::fs::read_link(&path).ok()?.into_os_string().into_string().ok()?;
    Some(entry_of(link, &meta, GenerationContent::Symlink(target)))
}

/// The directory `dir` and everything below it, parents first, within the generation limits.
fn read_dir_tree(root: &Path, dir: &str) -> Option<Vec<GenerationEntry>> {
    let meta = std::fs::symlink_metadata(root.join(dir)).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let mut entries = vec![entry_of(dir, &meta, GenerationContent::Dir)];
    let mut bytes = 0u64;
    let mut next = 0;
    while next < entries.len() {
        if entries[next].content == GenerationContent::Dir {
            let parent = entries[next].path.clone();
            let mut names: Vec<String> = std::fs::read_dir(root.join(&parent))
                .ok()?
                .map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
                .collect::<Option<_>>()?;
            names.sort();
            for name in names {
                let path = format!("{parent}/{name}");
                let entry = read_entry(root, &path, &mut bytes)?;
                entries.push(entry);
                if entries.len() > MAX_GENERATION_ENTRIES {
                    return None;
                }
            }
        }
        next += 1;
    }
    Some(entries)
}

fn read_entry(root: &Path, path: &str, bytes: &mut u64) -> Option<GenerationEntry> {
    let host = root.join(path);
    let meta = std::fs::symlink_metadata(&host).ok()?;
    let ft = meta.file_type();
    let content = if ft.is_dir() {
        GenerationContent::Dir
    } else if ft.is_symlink() {
        GenerationContent::Symlink(std::fs::read_link(&host).ok()?.into_os_string().into_string().ok()?)
    } else if ft.is_file() {
        // The metadata comes from the opened file, so it describes the content read.
        let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&host).ok()?;
        let meta = file.metadata().ok()?;
        *bytes = bytes.checked_add(meta.size())?;
        if *bytes > MAX_GENERATION_BYTES {
            return None;
        }
        let mut content = Vec::with_capacity(usize::try_from(meta.size()).ok()?);
        file.by_ref().take(meta.size() + 1).read_to_end(&mut content).ok()?;
        if content.len() as u64 != meta.size() {
            return None;
        }
        return Some(entry_of(path, &meta, GenerationContent::File(content)));
    } else {
        return None;
    };
    Some(entry_of(path, &meta, content))
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
        let g = read_generation(root.path(), "..data", 7).unwrap();
        assert_eq!(g.order, 7);
        assert_eq!(g.link.content, GenerationContent::Symlink("..2026_12_06_09_00_00.1".into()));
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
        assert_eq!(g.entries[2].content, GenerationContent::File(b"p\0w".to_vec()));
        assert_eq!(g.entries[2].size, 3);
        let meta = std::fs::symlink_metadata(root.path().join("..2026_12_06_09_00_00.1/username")).unwrap();
        assert_eq!((g.entries[3].ino, g.entries[3].mode), (meta.ino(), meta.mode() & 0o7777));
    }

    #[test]
    fn links_out_of_their_directory_and_oversized_generations_give_none() {
        let root = tempfile::tempdir().unwrap();
        assert!(read_generation(root.path(), "..data", 1).is_none(), "no link at all");
        symlink("../outside", root.path().join("..data")).unwrap();
        assert!(read_generation(root.path(), "..data", 1).is_none());
        std::fs::remove_file(root.path().join("..data")).unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        symlink("/etc", root.path().join("..data")).unwrap();
        assert!(read_generation(root.path(), "..data", 1).is_none());
        std::fs::remove_file(root.path().join("..data")).unwrap();
        assert!(read_generation(root.path(), "key", 1).is_none(), "not a ..data link");

        let big = vec![b'x'; (MAX_GENERATION_BYTES / 2 + 1) as usize];
        kubelet_layout(root.path(), "..big", &[("a", &big), ("b", &big)]);
        assert!(read_generation(root.path(), "..data", 1).is_none());
        std::fs::remove_file(root.path().join("..big/b")).unwrap();
        assert!(read_generation(root.path(), "..data", 1).is_some());
    }

    #[test]
    fn a_link_in_a_subdirectory_names_its_sibling() {
        assert_eq!(published_dir("a/b/..data", "..2026").as_deref(), Some("a/b/..2026"));
        assert_eq!(published_dir("..data", "..2026").as_deref(), Some("..2026"));
        assert_eq!(published_dir("..data", "x/y"), None);
        assert_eq!(published_dir("..data", ".."), None);
    }
}
