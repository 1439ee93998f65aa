//! Atomic file replacement: readers see the old content or the whole new content, never half.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary sibling used while `path` is written: hidden, per process, and ending with the
/// original file name so extension-based writers (`.nii.gz` → gzip) behave the same.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name"))?;
    Ok(path.with_file_name(format!(".tmp-{}.{}", std::process::id(), name.to_string_lossy())))
}

/// Lets `write` produce the file at a temporary path, then renames it onto `path`; on failure
/// the temporary file is removed and `path` is untouched.
pub fn atomic_with(path: &Path, write: impl FnOnce(&Path) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Builds a directory with `build` at a temporary sibling of `path`, then renames it onto
/// `path` (absent, or an empty directory, which it replaces); on failure the partial directory
/// is removed and `path` is untouched. `moved` turns a failed rename into the caller's error.
pub fn atomic_dir<T, E>(path: &Path, build: impl FnOnce(&Path) -> Result<T, E>, moved: impl FnOnce(io::Error) -> E) -> Result<T, E> {
    let tmp = match temp_path(path) {
        Ok(t) => t,
        Err(e) => return Err(moved(e)),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let result = build(&tmp).and_then(|done| {
        if path.is_dir() {
            // Only an empty one goes; a full one makes the rename fail below.
            let _ = std::fs::remove_dir(path);
        }
        std::fs::rename(&tmp, path).map(|()| done).map_err(moved)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes `bytes` atomically and flushes them to disk before the rename (for checkpoints and
/// records, which must survive a crash).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })
}

/// A file written in pieces, in any order, at its temporary sibling, and renamed onto its path
/// only by [`AtomicFile::commit`] (after an fsync); dropped uncommitted (an error, a panic), the
/// temporary file is removed and the path is untouched. For outputs too large to build in
/// memory first (a prediction's probabilities, written slab by slab).
pub struct AtomicFile {
    path: PathBuf,
    /// The temporary sibling, until it is renamed onto `path`.
    tmp: Option<PathBuf>,
    file: Option<std::fs::File>,
}

impl AtomicFile {
    /// Creates (truncates) the temporary sibling of `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        let tmp = temp_path(path)?;
        let file = std::fs::File::create(&tmp)?;
        Ok(Self { path: path.to_path_buf(), tmp: Some(tmp), file: Some(file) })
    }

    /// Writes `bytes` at byte `offset` of the temporary file (the file grows as needed).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        use std::io::Seek;
        let mut f = self.file.as_ref().expect("open until committed");
        f.seek(io::SeekFrom::Start(offset))?;
        f.write_all(bytes)
    }

    /// Flushes the file to disk and renames it onto its path.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.take().expect("open until committed").sync_all()?;
        let tmp = self.tmp.as_ref().expect("there until renamed");
        std::fs::rename(tmp, &self.path)?;
        self.tmp = None;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Not committed (or the rename failed): the partial file goes.
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("stu-core-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.nii.gz");
        write_atomic(&p, b"one").unwrap();
        let err = atomic_with(&p, |tmp| {
            assert!(tmp.to_string_lossy().ends_with("a.nii.gz"));
            std::fs::write(tmp, b"half")?;
            Err(io::Error::other("fail"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "the temporary file is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_written_in_pieces_appears_only_when_committed() {
        let dir = std::env::temp_dir().join(format!("stu-core-pieces-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("p.safetensors");
        write_atomic(&p, b"old").unwrap();
        {
            let f = AtomicFile::create(&p).unwrap();
            f.write_at(b"cd", 2).unwrap();
            // dropped uncommitted
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "the temporary file is gone");
        let f = AtomicFile::create(&p).unwrap();
        f.write_at(b"cd", 2).unwrap();
        f.write_at(b"ab", 0).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"old", "not before the commit");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abcd");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_appear_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("stu-core-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("ds");
        let build = |ok: bool| {
            move |tmp: &Path| -> io::Result<u8> {
                std::fs::create_dir_all(tmp.join("sub"))?;
                std::fs::write(tmp.join("sub/f"), b"x")?;
                if ok { Ok(7) } else { Err(io::Error::other("fail")) }
            }
        };
        assert!(atomic_dir(&out, build(false), |e| e).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the partial directory is gone, nothing in its place");
        std::fs::create_dir(&out).unwrap();
        assert_eq!(atomic_dir(&out, build(true), |e| e).unwrap(), 7, "an empty directory is replaced");
        assert_eq!(std::fs::read(out.join("sub/f")).unwrap(), b"x");
        assert!(atomic_dir(&out, build(true), |e| e).is_err(), "a full one is not");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "and its temporary sibling is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
