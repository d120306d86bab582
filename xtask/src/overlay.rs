//! Lays the project's overlay on a copy of the pristine kernel tree.
//!
//! The tree is a hard-linked copy of the pristine source (cheap). The
//! overlay is: new files (`guest-kernel/overlay/`, `host/overlay/`, the
//! shared sources named in `guest-kernel/overlay.map`) and patches to
//! existing files (`guest-kernel/patches/`, then `host/patches/`). Each run
//! computes the wanted content of every managed file and writes only what
//! differs, always through a new inode (never through a hard link into the
//! pristine tree), so an incremental build recompiles exactly what changed.
//! Files the overlay managed before but no longer does are restored.

use crate::sh;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the manifest of managed files, kept at the tree root.
const MANIFEST: &str = ".kpm-overlay";

/// The overlay as read from the repository.
pub struct Overlay {
    /// Tree path -> repository file providing it.
    pub files: BTreeMap<PathBuf, PathBuf>,
    /// Patches to existing files, in application order.
    pub patches: Vec<PathBuf>,
}

impl Overlay {
    pub fn load(repo: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        for dir in ["guest-kernel/overlay", "host/overlay"] {
            let root = repo.join(dir);
            for f in walk(&root)? {
                let rel = f.strip_prefix(&root)?.to_path_buf();
                if let Some(prev) = files.insert(rel.clone(), f.clone()) {
                    bail!(
                        "{} is provided twice: {} and {}",
                        rel.display(),
                        prev.display(),
                        f.display()
                    );
                }
            }
        }
        let map = repo.join("guest-kernel/overlay.map");
        let text = std::fs::read_to_string(&map)
            .with_context(|| format!("cannot read {}", map.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(src), Some(dst), None) = (it.next(), it.next(), it.next()) else {
                bail!(
                    "{}:{}: expected `repo-path tree-path`",
                    map.display(),
                    i + 1
                );
            };
            let src = repo.join(src);
            if !src.is_file() {
                bail!(
                    "{}:{}: {} does not exist",
                    map.display(),
                    i + 1,
                    src.display()
                );
            }
            if files.insert(PathBuf::from(dst), src).is_some() {
                bail!("{}:{}: {dst} is provided twice", map.display(), i + 1);
            }
        }
        let mut patches = Vec::new();
        for dir in ["guest-kernel/patches", "host/patches"] {
            let mut p: Vec<PathBuf> = walk(&repo.join(dir))?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "patch"))
                .collect();
            p.sort();
            patches.extend(p);
        }
        Ok(Overlay { files, patches })
    }

    /// The inputs that can change the kernel configuration (Kconfig files
    /// and patches), for hashing into the configuration stamp.
    pub fn config_inputs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(dst, _)| {
                dst.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("Kconfig"))
            })
            .map(|(_, src)| src.clone())
            .collect();
        v.extend(self.patches.iter().cloned());
        v
    }
}

/// Regular files below `root` (none if it does not exist), sorted.
fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Files a unified diff touches (`+++ b/path`), in order of appearance.
pub fn patched_files(diff: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for l in diff.lines() {
        if let Some(rest) = l.strip_prefix("+++ ") {
            let path = rest.split('\t').next().unwrap_or(rest).trim();
            if path == "/dev/null" {
                continue;
            }
            let path = path.strip_prefix("b/").unwrap_or(path);
            let p = PathBuf::from(path);
            if !v.contains(&p) {
                v.push(p);
            }
        }
    }
    v
}

/// `diff` without the sections of the files in `drop` (a section starts at
/// its `diff --git` line, or at its `---` line when there is none).
pub fn without_files(diff: &str, drop: &[PathBuf]) -> String {
    let lines: Vec<&str> = diff.split_inclusive('\n').collect();
    let mut out = String::new();
    let mut keep = true;
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let starts_git = l.starts_with("diff --git ");
        let starts_plain = l.starts_with("--- ")
            && lines.get(i + 1).is_some_and(|n| n.starts_with("+++ "))
            && !(i > 0 && out_of_git_header(&lines[..i]));
        if starts_git || starts_plain {
            // The section's file: its `+++` line, or `---` for a deletion.
            let target = lines[i..]
                .iter()
                .find_map(|n| n.strip_prefix("+++ "))
                .map(|rest| rest.split('\t').next().unwrap_or(rest).trim())
                .map(|path| path.strip_prefix("b/").unwrap_or(path));
            keep = !target.is_some_and(|t| drop.iter().any(|d| Path::new(t) == d));
        }
        if keep {
            out.push_str(l);
        }
        i += 1;
    }
    out
}

/// Whether the last header line before a `---` line is part of a `diff
/// --git` header (`index`, `new file mode`, ...), so that `---` does not
/// start a section of its own.
fn out_of_git_header(before: &[&str]) -> bool {
    for l in before.iter().rev() {
        if l.starts_with("diff --git ") {
            return true;
        }
        let header = [
            "index ",
            "new file mode",
            "deleted file mode",
            "old mode",
            "new mode",
            "similarity",
            "rename ",
            "copy ",
        ]
        .iter()
        .any(|h| l.starts_with(h));
        if !header {
            return false;
        }
    }
    false
}

/// Result of laying the overlay.
pub struct Applied {
    pub managed: usize,
    pub written: Vec<PathBuf>,
}

/// Makes `tree` = `pristine` + overlay, touching only what must change.
pub fn apply(ov: &Overlay, pristine: &Path, tree: &Path, scratch: &Path) -> Result<Applied> {
    if !tree.join("Makefile").is_file() {
        let partial = sh::with_suffix(tree, ".partial");
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(partial.parent().unwrap_or(tree))?;
        println!(
            "overlay: linking a working tree from {}",
            pristine.display()
        );
        sh::run(Command::new("cp").arg("-al").arg(pristine).arg(&partial))?;
        std::fs::rename(&partial, tree)?;
    }

    // Wanted content of every managed file.
    let mut want: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    for (dst, src) in &ov.files {
        want.insert(
            dst.clone(),
            std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?,
        );
    }
    sh::fresh_dir(scratch)?;
    let mut patched = Vec::new();
    for p in &ov.patches {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let files = patched_files(&text);
        if files.is_empty() {
            bail!("{} touches no file", p.display());
        }
        // What a patch changes in files the overlay provides whole is a
        // step of the exported series (`cargo xtask series`): the overlay
        // already holds its result, so only the rest applies here.
        let ours: Vec<PathBuf> = files
            .iter()
            .filter(|f| ov.files.contains_key(*f))
            .cloned()
            .collect();
        if ours.len() == files.len() {
            continue;
        }
        let text = without_files(&text, &ours);
        for f in files.into_iter().filter(|f| !ours.contains(f)) {
            if !patched.contains(&f) {
                let orig = pristine.join(&f);
                if orig.is_file() {
                    std::fs::create_dir_all(scratch.join(&f).parent().unwrap_or(scratch))?;
                    std::fs::copy(&orig, scratch.join(&f))?;
                }
                patched.push(f);
            }
        }
        let out = sh::run_with_stdin(
            Command::new("patch")
                .args(["-p1", "-s", "-N", "-F0", "--no-backup-if-mismatch", "-d"])
                .arg(scratch),
            text.as_bytes(),
        )
        .context("cannot run patch (setup installs it)")?;
        if !out.status.success() {
            bail!(
                "{} does not apply to the pristine tree:\n{}{}",
                p.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for f in &patched {
        want.insert(f.clone(), std::fs::read(scratch.join(f))?);
    }

    // Restore what the overlay managed before but no longer does.
    let manifest = tree.join(MANIFEST);
    let old = std::fs::read_to_string(&manifest).unwrap_or_default();
    let mut written = Vec::new();
    for f in old.lines().map(PathBuf::from) {
        if want.contains_key(&f) {
            continue;
        }
        let orig = pristine.join(&f);
        if orig.is_file() {
            if sh::write_if_changed(&tree.join(&f), &std::fs::read(&orig)?)? {
                written.push(f);
            }
        } else if tree.join(&f).exists() {
            std::fs::remove_file(tree.join(&f))?;
            written.push(f);
        }
    }
    for (f, data) in &want {
        if sh::write_if_changed(&tree.join(f), data)? {
            written.push(f.clone());
        }
    }
    let list: String = want.keys().map(|p| format!("{}\n", p.display())).collect();
    sh::write_if_changed(&manifest, list.as_bytes())?;
    Ok(Applied {
        managed: want.len(),
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_patched_files() {
        let d = "Subject: x\n---\n--- a/x/y.c\n+++ b/x/y.c\n@@ -1 +1 @@\n--- a/z.h\t2020\n+++ b/z.h\t2020\n+++ /dev/null\n";
        assert_eq!(
            patched_files(d),
            [PathBuf::from("x/y.c"), PathBuf::from("z.h")]
        );
    }

    #[test]
    fn drops_the_sections_of_overlay_files() {
        let git = "Subject: x\n---\ndiff --git a/o.c b/o.c\nindex 1..2 100644\n--- a/o.c\n+++ b/o.c\n@@ -1 +1 @@\n-a\n+b\ndiff --git a/t.c b/t.c\n--- a/t.c\n+++ b/t.c\n@@ -1 +1 @@\n-c\n+d\n";
        let kept = without_files(git, &[PathBuf::from("o.c")]);
        assert_eq!(
            kept,
            "Subject: x\n---\ndiff --git a/t.c b/t.c\n--- a/t.c\n+++ b/t.c\n@@ -1 +1 @@\n-c\n+d\n"
        );
        let plain = "--- a/t.c\n+++ b/t.c\n@@ -1 +1 @@\n-c\n+d\n--- a/o.c\n+++ b/o.c\n@@ -1 +1 @@\n-a\n+b\n";
        assert_eq!(
            without_files(plain, &[PathBuf::from("o.c")]),
            "--- a/t.c\n+++ b/t.c\n@@ -1 +1 @@\n-c\n+d\n"
        );
        assert_eq!(without_files(plain, &[]), plain);
        // A removed line that reads like a header stays in its hunk.
        let tricky = "--- a/t.c\n+++ b/t.c\n@@ -1,2 +1 @@\n--- a/o.c\n-x\n+y\n";
        assert_eq!(without_files(tricky, &[PathBuf::from("o.c")]), tricky);
    }

    #[test]
    fn overlay_applies_incrementally_and_restores() {
        let base = std::env::temp_dir().join(format!("xtask-overlay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (pristine, tree, scratch, repo) = (
            base.join("pristine"),
            base.join("tree"),
            base.join("scratch"),
            base.join("repo"),
        );
        std::fs::create_dir_all(pristine.join("d")).unwrap();
        std::fs::write(pristine.join("Makefile"), "VERSION = 7\n").unwrap();
        std::fs::write(pristine.join("d/a.c"), "one\ntwo\n").unwrap();
        std::fs::create_dir_all(repo.join("guest-kernel/overlay/d")).unwrap();
        std::fs::create_dir_all(repo.join("guest-kernel/patches")).unwrap();
        std::fs::write(repo.join("guest-kernel/overlay.map"), "x.rs d/x.rs\n").unwrap();
        std::fs::write(repo.join("x.rs"), "shared\n").unwrap();
        std::fs::write(repo.join("guest-kernel/overlay/d/new.rs"), "new\n").unwrap();
        std::fs::write(
            repo.join("guest-kernel/patches/0001.patch"),
            "--- a/d/a.c\n+++ b/d/a.c\n@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n",
        )
        .unwrap();

        let ov = Overlay::load(&repo).unwrap();
        let r = apply(&ov, &pristine, &tree, &scratch).unwrap();
        assert_eq!(r.managed, 3);
        assert_eq!(
            std::fs::read_to_string(tree.join("d/a.c")).unwrap(),
            "one\nTWO\n"
        );
        assert_eq!(
            std::fs::read_to_string(pristine.join("d/a.c")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(
            std::fs::read_to_string(tree.join("d/x.rs")).unwrap(),
            "shared\n"
        );
        // Nothing changed: nothing written.
        assert!(apply(&ov, &pristine, &tree, &scratch)
            .unwrap()
            .written
            .is_empty());
        // One file changed: only it is written.
        std::fs::write(repo.join("x.rs"), "shared 2\n").unwrap();
        let r = apply(&Overlay::load(&repo).unwrap(), &pristine, &tree, &scratch).unwrap();
        assert_eq!(r.written, [PathBuf::from("d/x.rs")]);
        // Dropping the patch and a new file restores and removes them.
        std::fs::remove_file(repo.join("guest-kernel/patches/0001.patch")).unwrap();
        std::fs::remove_file(repo.join("guest-kernel/overlay/d/new.rs")).unwrap();
        apply(&Overlay::load(&repo).unwrap(), &pristine, &tree, &scratch).unwrap();
        assert_eq!(
            std::fs::read_to_string(tree.join("d/a.c")).unwrap(),
            "one\ntwo\n"
        );
        assert!(!tree.join("d/new.rs").exists());
        // A patch that does not apply is named.
        std::fs::write(
            repo.join("guest-kernel/patches/0002.patch"),
            "--- a/d/a.c\n+++ b/d/a.c\n@@ -1,2 +1,2 @@\n one\n-three\n+3\n",
        )
        .unwrap();
        let e = apply(&Overlay::load(&repo).unwrap(), &pristine, &tree, &scratch)
            .err()
            .unwrap();
        assert!(format!("{e}").contains("0002.patch does not apply"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
