//! Running external programs with errors that name them.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

/// Formats a command line for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; fails naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is shown on failure.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with `input` on its stdin and returns its output, whatever
/// its exit status.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<std::process::Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", show(cmd)))?;
    // Write from another thread: a child that fills its output pipes
    // before reading all its input must not deadlock with us.
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .with_context(|| format!("`{}` did not finish", show(cmd)))?;
    match writer.join() {
        Ok(Ok(())) => {}
        // A child that exits without reading everything (EPIPE) reports
        // that through its status and output.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Ok(Err(e)) => return Err(e).with_context(|| format!("cannot feed `{}`", show(cmd))),
        Err(_) => bail!("the thread feeding `{}` panicked", show(cmd)),
    }
    Ok(out)
}

/// Whether `prog` can be found on PATH (or is an existing path).
pub fn have(prog: &str) -> bool {
    if prog.contains('/') {
        return Path::new(prog).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// `path` with `suffix` appended to its file name (`a/7.2.12-1` ->
/// `a/7.2.12-1.partial`): unlike `Path::with_extension`, it never eats a
/// dotted version number.
pub fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes `data` to `path` through a temporary file and a rename, so that a
/// reader never sees a partial file and a hard link to the old content is
/// broken rather than written through. Leaves the file alone (and its mtime)
/// when the content is already the same; returns whether it wrote.
pub fn write_if_changed(path: &Path, data: &[u8]) -> Result<bool> {
    if let Ok(old) = std::fs::read(path) {
        if old == data {
            return Ok(false);
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = with_suffix(path, ".kpm-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    Ok(true)
}

/// Makes `dir` an empty directory: whatever was there is removed first.
/// A removal that fails for any reason but absence is an error, so that
/// stale content is never taken for new.
pub fn fresh_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", dir.display()));
        }
        _ => {}
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// A directory given with `--out`: commands write into it, but never delete
/// what they did not write there. A file named [`OutDir::MARKER`] lists
/// what the last run wrote.
pub struct OutDir {
    dir: std::path::PathBuf,
}

impl OutDir {
    /// The list of files a run wrote, kept in the directory.
    pub const MARKER: &'static str = ".kvm-protmem-output";

    /// Takes `dir` for output: a new directory, an empty one, or one a
    /// run made before (it has the marker), whose listed files are removed.
    /// Anything else is refused with one line, and nothing is touched.
    pub fn claim(dir: &Path) -> Result<Self> {
        let marker = dir.join(Self::MARKER);
        match std::fs::read_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
            Ok(mut entries) => {
                if marker.is_file() {
                    let listed = std::fs::read_to_string(&marker)
                        .with_context(|| format!("cannot read {}", marker.display()))?;
                    for name in listed.lines().filter(|l| !l.is_empty()) {
                        // Only plain names: never a path out of the directory.
                        if name.contains('/') || name == ".." || name == "." {
                            bail!("{}: unexpected entry {name:?}", marker.display());
                        }
                        match std::fs::remove_file(dir.join(name)) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                return Err(e).with_context(|| {
                                    format!("cannot remove {}", dir.join(name).display())
                                })
                            }
                            _ => {}
                        }
                    }
                } else if entries.next().is_some() {
                    bail!(
                        "refusing to write into {}: it is not empty and no earlier run of this \
                         command wrote it (give a new or empty directory)",
                        dir.display()
                    );
                }
            }
        }
        Ok(OutDir {
            dir: dir.to_path_buf(),
        })
    }

    /// Records that this run wrote `names` (file names in the directory).
    pub fn record(&self, names: &[String]) -> Result<()> {
        let mut list = names.join("\n");
        list.push('\n');
        let marker = self.dir.join(Self::MARKER);
        std::fs::write(&marker, list).with_context(|| format!("cannot write {}", marker.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_dirs_keep_what_we_did_not_write() {
        let base = std::env::temp_dir().join(format!("xtask-outdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // A new directory is created and taken.
        let d = base.join("new");
        OutDir::claim(&d)
            .unwrap()
            .record(&["a.patch".into()])
            .unwrap();
        std::fs::write(d.join("a.patch"), "ours").unwrap();
        // Someone else's file put there later survives the next run, ours
        // is removed.
        std::fs::write(d.join("notes.txt"), "theirs").unwrap();
        OutDir::claim(&d).unwrap();
        assert!(!d.join("a.patch").exists());
        assert_eq!(
            std::fs::read_to_string(d.join("notes.txt")).unwrap(),
            "theirs"
        );
        // A non-empty directory we never wrote is refused, untouched.
        let h = base.join("home");
        std::fs::create_dir_all(&h).unwrap();
        std::fs::write(h.join("keep.txt"), "x").unwrap();
        let e = OutDir::claim(&h).err().unwrap().to_string();
        assert!(
            e.contains("refusing to write into") && e.contains("home"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(h.join("keep.txt")).unwrap(), "x");
        // An empty one is fine.
        let empty = base.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        OutDir::claim(&empty).unwrap();
        // A marker naming a path outside is refused.
        std::fs::write(empty.join(OutDir::MARKER), "../keep.txt\n").unwrap();
        assert!(OutDir::claim(&empty).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn fresh_dir_empties_or_creates() {
        let dir = std::env::temp_dir().join(format!("xtask-fresh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        fresh_dir(&dir.join("new")).unwrap();
        assert!(dir.join("new").is_dir());
        std::fs::write(dir.join("new/stale"), b"x").unwrap();
        fresh_dir(&dir.join("new")).unwrap();
        assert_eq!(std::fs::read_dir(dir.join("new")).unwrap().count(), 0);
        std::fs::write(dir.join("file"), b"x").unwrap();
        let e = fresh_dir(&dir.join("file")).unwrap_err();
        assert!(format!("{e:#}").contains("cannot remove"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_if_changed_keeps_identical_files_and_breaks_hard_links() {
        let dir = std::env::temp_dir().join(format!("xtask-sh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        std::fs::write(&a, b"one").unwrap();
        let _ = std::fs::remove_file(&b);
        std::fs::hard_link(&a, &b).unwrap();
        assert!(!write_if_changed(&b, b"one").unwrap());
        assert!(write_if_changed(&b, b"two").unwrap());
        assert_eq!(std::fs::read(&a).unwrap(), b"one");
        assert_eq!(std::fs::read(&b).unwrap(), b"two");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn suffix_keeps_version_numbers() {
        assert_eq!(
            with_suffix(Path::new("/c/rust-src/1.95.0+dfsg1-2~bpo13+1"), ".partial"),
            Path::new("/c/rust-src/1.95.0+dfsg1-2~bpo13+1.partial")
        );
    }

    #[test]
    fn tail_takes_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
