//! `cargo xtask series`: the whole change as a `git format-patch` series
//! against the pinned base, and the checks maintainers run on it.
//!
//! The repository keeps each change once: patches to existing files in
//! `guest-kernel/patches/` and `host/patches/` (in series order), new files
//! in the overlay (including the shared Rust sources that cargo tests).
//! `guest-kernel/series.map` says which patch adds which new file. The
//! export builds a scratch git repository holding the pristine version of
//! every file the series touches, commits each patch with its new files,
//! and runs `git format-patch --cover-letter`.
//!
//! Checks (`cargo xtask test` runs them): the series applies with `git am`
//! to the pristine files and gives exactly the tree the kernel is built
//! from; `checkpatch.pl --strict` finds no error, and every warning type
//! it reports is justified in `guest-kernel/checkpatch.justify`.

use crate::ctx::Ctx;
use crate::overlay::{self, Overlay};
use crate::sh;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One patch of the series.
pub struct Step {
    /// The repository's patch file (its message and its diff).
    pub patch: PathBuf,
    /// New files (tree paths) this patch adds from the overlay.
    pub adds: Vec<PathBuf>,
}

/// The series plan: every patch in order, each overlay file added once.
pub fn plan(repo: &Path, ov: &Overlay) -> Result<Vec<Step>> {
    let map_path = repo.join("guest-kernel/series.map");
    let text = std::fs::read_to_string(&map_path)
        .with_context(|| format!("cannot read {}", map_path.display()))?;
    let mut adds: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(patch), Some(path), None) = (it.next(), it.next(), it.next()) else {
            bail!(
                "{}:{}: expected `patch-file tree-path`",
                map_path.display(),
                i + 1
            );
        };
        let path = PathBuf::from(path);
        if !ov.files.contains_key(&path) {
            bail!(
                "{}:{}: {} is not an overlay file",
                map_path.display(),
                i + 1,
                path.display()
            );
        }
        if !seen.insert(path.clone()) {
            bail!(
                "{}:{}: {} is added twice",
                map_path.display(),
                i + 1,
                path.display()
            );
        }
        adds.entry(patch.to_string()).or_default().push(path);
    }
    let missing: Vec<String> = ov
        .files
        .keys()
        .filter(|p| !seen.contains(*p))
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: no patch adds {}: say in which patch each overlay file enters the series",
            map_path.display(),
            missing.join(", ")
        );
    }
    let steps: Vec<Step> = ov
        .patches
        .iter()
        .map(|p| Step {
            adds: adds.remove(&file_name(p)).unwrap_or_default(),
            patch: p.clone(),
        })
        .collect();
    if let Some(name) = adds.keys().next() {
        bail!("{}: no patch named {name}", map_path.display());
    }
    Ok(steps)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The commit message of a repository patch: its header, without the
/// `Subject: [PATCH] ` prefix.
fn message(patch_text: &str, path: &Path) -> Result<String> {
    let Some(end) = patch_text.find("\n---\n") else {
        bail!("{}: no `---` line after the message", path.display());
    };
    let head = &patch_text[..end];
    let Some(rest) = head.strip_prefix("Subject: [PATCH] ") else {
        bail!(
            "{}: the first line must be `Subject: [PATCH] ...`",
            path.display()
        );
    };
    Ok(format!("{}\n", rest.trim_end()))
}

/// `git` in `dir`, with no user or system configuration but the identity.
fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(["-c", "core.autocrlf=false", "-c", "commit.gpgsign=false"]);
    c
}

/// The author from the user's git configuration; the series invents none.
fn author(repo: &Path) -> Result<(String, String)> {
    let get = |key: &str| -> Result<String> {
        let out = Command::new("git")
            .current_dir(repo)
            .args(["config", key])
            .output()
            .context("cannot run git")?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if v.is_empty() {
            bail!("git config {key} is not set: the series takes its author and Signed-off-by from it");
        }
        Ok(v)
    };
    Ok((get("user.name")?, get("user.email")?))
}

/// A scratch repository holding the pristine version of `files`,
/// committed as the base.
fn base_repo(dir: &Path, pristine: &Path, files: &BTreeSet<PathBuf>) -> Result<()> {
    sh::fresh_dir(dir)?;
    sh::run(git(dir).args(["init", "-q", "-b", "series"]))?;
    for f in files {
        let src = pristine.join(f);
        if src.is_file() {
            let dst = dir.join(f);
            std::fs::create_dir_all(dst.parent().context("path without parent")?)?;
            std::fs::copy(&src, &dst)?;
        }
    }
    sh::run(git(dir).args(["add", "-A"]))?;
    sh::run(
        git(dir)
            .args([
                "-c",
                "user.name=pristine",
                "-c",
                "user.email=pristine@localhost",
            ])
            .args(["commit", "-q", "--allow-empty", "-m", "pristine base"]),
    )?;
    sh::run(git(dir).args(["tag", "pristine"]))?;
    Ok(())
}

/// What an export produced.
pub struct Exported {
    /// The directory holding the series.
    pub dir: PathBuf,
    /// The cover letter (`0000-cover-letter.patch`).
    pub cover: PathBuf,
    /// The patches (without the cover letter), in order.
    pub patches: Vec<PathBuf>,
    /// Every file the series touches or adds (tree paths).
    pub files: BTreeSet<PathBuf>,
}

/// Who the series is from: the user (from git config), or, for the checks
/// in `cargo xtask test` on a machine without a git identity, a marked
/// placeholder that is never exported to a directory the user asked for.
pub enum From {
    User,
    CheckOnly,
}

/// Exports the series into `out` (emptied first).
pub fn export(ctx: &Ctx, pristine: &Path, out: &Path, from: From) -> Result<Exported> {
    let ov = Overlay::load(&ctx.repo)?;
    let steps = plan(&ctx.repo, &ov)?;
    let (name, email) = match (author(&ctx.repo), from) {
        (Ok(a), _) => a,
        (Err(e), From::User) => return Err(e),
        (Err(_), From::CheckOnly) => {
            println!("series: no git identity: checking with the placeholder author `series check <check@invalid>`");
            ("series check".to_string(), "check@invalid".to_string())
        }
    };
    let mut touched = BTreeSet::new();
    for s in &steps {
        let text = std::fs::read_to_string(&s.patch)?;
        touched.extend(overlay::patched_files(&text));
    }
    let mut all = touched.clone();
    all.extend(ov.files.keys().cloned());
    let work = ctx.cache.join("series/work");
    base_repo(&work, pristine, &touched)?;
    let ident = |c: &mut Command| {
        c.env("GIT_AUTHOR_NAME", &name)
            .env("GIT_AUTHOR_EMAIL", &email)
            .env("GIT_COMMITTER_NAME", &name)
            .env("GIT_COMMITTER_EMAIL", &email);
    };
    for (k, s) in steps.iter().enumerate() {
        let text = std::fs::read_to_string(&s.patch)?;
        let msg = message(&text, &s.patch)?;
        sh::run(
            git(&work)
                .args(["apply", "--index", "--whitespace=nowarn"])
                .arg(&s.patch),
        )
        .with_context(|| format!("{} does not apply in series order", s.patch.display()))?;
        for add in &s.adds {
            let dst = work.join(add);
            std::fs::create_dir_all(dst.parent().context("path without parent")?)?;
            std::fs::copy(&ov.files[add], &dst)?;
            sh::run(git(&work).arg("add").arg(add))?;
            // A later patch that changes this file (a series-only step,
            // see `overlay::apply`) is taken out again, latest first: it
            // comes back when its own patch applies.
            for later in steps[k + 1..].iter().rev() {
                let later_text = std::fs::read_to_string(&later.patch)?;
                if overlay::patched_files(&later_text).contains(add) {
                    sh::run(
                        git(&work)
                            .args(["apply", "-R", "--index", "--include"])
                            .arg(add)
                            .arg(&later.patch),
                    )
                    .with_context(|| {
                        format!(
                            "{} does not come out of {} as the overlay has it",
                            later.patch.display(),
                            add.display()
                        )
                    })?;
                }
            }
        }
        let msg_file = ctx.cache.join("series/msg");
        std::fs::write(&msg_file, msg)?;
        let mut c = git(&work);
        c.args(["commit", "-q", "-s", "-F"]).arg(&msg_file);
        ident(&mut c);
        sh::run(&mut c).with_context(|| format!("cannot commit {}", s.patch.display()))?;
    }
    let claim = sh::OutDir::claim(out)?;
    let mut c = git(&work);
    c.args([
        "format-patch",
        "-q",
        "--cover-letter",
        "--no-signature",
        "-o",
    ])
    .arg(out)
    .arg("pristine..HEAD");
    ident(&mut c);
    sh::run(&mut c)?;
    let mut patches: Vec<PathBuf> = std::fs::read_dir(out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    claim.record(
        &patches
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect::<Vec<_>>(),
    )?;
    if patches.len() < 2 {
        bail!("git format-patch wrote no series into {}", out.display());
    }
    let cover = patches.remove(0);
    Ok(Exported {
        dir: out.to_path_buf(),
        cover,
        patches,
        files: all,
    })
}

/// Fills the cover letter's subject and blurb from
/// `guest-kernel/cover-letter.txt` (first line the subject), followed by
/// the checkpatch findings and why each type stays.
fn write_cover(
    ctx: &Ctx,
    cover: &Path,
    findings: &[Finding],
    why: &BTreeMap<String, String>,
) -> Result<()> {
    let src = ctx.repo.join("guest-kernel/cover-letter.txt");
    let blurb =
        std::fs::read_to_string(&src).with_context(|| format!("cannot read {}", src.display()))?;
    let (subject, body) = blurb.split_once('\n').unwrap_or((&blurb, ""));
    let mut body = body.trim().to_string();
    let mut kinds: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for f in findings {
        kinds
            .entry((f.level.as_str(), f.kind.as_str()))
            .or_default()
            .push(f.patch.get(..4).unwrap_or(&f.patch));
    }
    body.push('\n');
    for ((level, kind), patches) in &kinds {
        let which: Vec<&str> = patches
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let item = format!(
            "- {level}:{kind} ({}x, {} {}): {}",
            patches.len(),
            if which.len() == 1 { "patch" } else { "patches" },
            which.join(", "),
            why.get(*kind).map_or("not justified", String::as_str)
        );
        body.push('\n');
        body.push_str(&wrap(&item, 72, "  "));
    }
    if kinds.is_empty() {
        body.push_str("\n(none)");
    }
    let text = std::fs::read_to_string(cover)?;
    let text = text
        .replace("*** SUBJECT HERE ***", subject.trim())
        .replace("*** BLURB HERE ***", &body);
    std::fs::write(cover, text)?;
    Ok(())
}

/// `text` folded at spaces into lines of at most `width` columns (a word
/// longer than that stays whole), the lines after the first indented by
/// `indent`, as a mail body's list items are.
fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            out.push_str(&line);
            out.push('\n');
            line = indent.to_string();
        } else if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out
}

/// Applies the exported series with `git am` to the pristine files and
/// compares the result with `tree`; returns the files that differ.
pub fn check_applies(
    ctx: &Ctx,
    pristine: &Path,
    tree: &Path,
    ex: &Exported,
) -> Result<Vec<PathBuf>> {
    let dir = ctx.cache.join("series/am");
    let touched: BTreeSet<PathBuf> = ex
        .files
        .iter()
        .filter(|f| pristine.join(f).is_file())
        .cloned()
        .collect();
    base_repo(&dir, pristine, &touched)?;
    let mut c = git(&dir);
    c.args([
        "-c",
        "user.name=am",
        "-c",
        "user.email=am@localhost",
        "am",
        "-q",
    ])
    .args(&ex.patches);
    sh::run(&mut c).context("git am of the exported series failed")?;
    let mut differ = Vec::new();
    for f in &ex.files {
        let a = std::fs::read(dir.join(f)).ok();
        let b = std::fs::read(tree.join(f)).ok();
        if a != b {
            differ.push(f.clone());
        }
    }
    Ok(differ)
}

/// One checkpatch finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub patch: String,
    /// ERROR, WARNING or CHECK.
    pub level: String,
    /// The checkpatch type, e.g. `FILE_PATH_CHANGES`.
    pub kind: String,
    pub text: String,
}

/// Parses `checkpatch.pl --terse --show-types` output.
fn parse_checkpatch(patch: &str, out: &str) -> Vec<Finding> {
    out.lines()
        .filter_map(|l| {
            // "<file>:<line>: LEVEL:TYPE: text"
            let (level, rest) = ["ERROR:", "WARNING:", "CHECK:"].iter().find_map(|lv| {
                l.find(lv)
                    .map(|i| (lv.trim_end_matches(':'), &l[i + lv.len()..]))
            })?;
            let (kind, text) = rest.split_once(':').unwrap_or((rest, ""));
            Some(Finding {
                patch: patch.to_string(),
                level: level.to_string(),
                kind: kind.trim().to_string(),
                text: text.trim().to_string(),
            })
        })
        .collect()
}

/// Runs `scripts/checkpatch.pl --strict` from `tree` on every patch.
pub fn checkpatch(tree: &Path, ex: &Exported) -> Result<Vec<Finding>> {
    let script = tree.join("scripts/checkpatch.pl");
    if !script.is_file() {
        bail!("{} is missing", script.display());
    }
    let mut all = Vec::new();
    for p in &ex.patches {
        let out = Command::new("perl")
            .current_dir(tree)
            .arg(&script)
            .args(["--strict", "--terse", "--show-types", "--no-summary"])
            .arg(p)
            .output()
            .context("cannot run perl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        all.extend(parse_checkpatch(&file_name(p), &text));
    }
    Ok(all)
}

/// The justified checkpatch types: `TYPE  reason` lines.
pub fn justifications(repo: &Path) -> Result<BTreeMap<String, String>> {
    let p = repo.join("guest-kernel/checkpatch.justify");
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, r) = l.split_once(char::is_whitespace)?;
            Some((k.to_string(), r.trim().to_string()))
        })
        .collect())
}

/// `cargo xtask series`: exports, then checks; prints where the series is.
pub fn run(
    ctx: &Ctx,
    pristine: &Path,
    tree: &Path,
    out: Option<PathBuf>,
    from: From,
) -> Result<Exported> {
    let out = match out {
        Some(dir) => dir,
        None => {
            // The cache's own directory: emptied whole.
            let dir = ctx.cache.join("series/out");
            sh::fresh_dir(&dir)?;
            dir
        }
    };
    let ex = export(ctx, pristine, &out, from)?;
    println!(
        "series: {} patches and a cover letter in {}",
        ex.patches.len(),
        ex.dir.display()
    );
    for p in &ex.patches {
        let text = std::fs::read_to_string(p)?;
        let (plus, minus) = text
            .lines()
            .skip_while(|l| !l.starts_with("diff --git"))
            .fold((0, 0), |(a, d), l| {
                if l.starts_with('+') && !l.starts_with("+++") {
                    (a + 1, d)
                } else if l.starts_with('-') && !l.starts_with("---") {
                    (a, d + 1)
                } else {
                    (a, d)
                }
            });
        println!("  {}  +{plus} -{minus}", file_name(p));
    }
    let differ = check_applies(ctx, pristine, tree, &ex)?;
    if !differ.is_empty() {
        bail!(
            "the series applied with git am differs from the built tree in: {}",
            differ
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "series: git am onto the pristine files gives the built tree ({} files compared)",
        ex.files.len()
    );
    let findings = checkpatch(tree, &ex)?;
    let why = justifications(&ctx.repo)?;
    write_cover(ctx, &ex.cover, &findings, &why)?;
    let errors: Vec<&Finding> = findings.iter().filter(|f| f.level == "ERROR").collect();
    let unjustified: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.level != "ERROR" && !why.contains_key(&f.kind))
        .collect();
    let count = |lv: &str| findings.iter().filter(|f| f.level == lv).count();
    println!(
        "series: checkpatch --strict: {} errors, {} warnings, {} checks",
        count("ERROR"),
        count("WARNING"),
        count("CHECK")
    );
    for f in &findings {
        println!(
            "  {} {}:{} {}{}",
            f.patch,
            f.level,
            f.kind,
            f.text,
            why.get(&f.kind)
                .map(|w| format!("  [justified: {w}]"))
                .unwrap_or_default()
        );
    }
    if !errors.is_empty() || !unjustified.is_empty() {
        bail!(
            "checkpatch: {} errors, {} findings of unjustified types (guest-kernel/checkpatch.justify)",
            errors.len(),
            unjustified.len()
        );
    }
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_items_are_folded_for_mail() {
        let item = "- WARNING:LONG_LINE_STRING (2x, patch 0007): the long lines are single \
                    user-visible messages, kept whole so that they can be grepped";
        let w = wrap(item, 40, "  ");
        assert_eq!(
            w,
            "- WARNING:LONG_LINE_STRING (2x, patch\n  0007): the long lines are single\n  \
             user-visible messages, kept whole so\n  that they can be grepped"
        );
        assert!(w.lines().all(|l| l.len() <= 40), "{w}");
        assert_eq!(
            w.split_whitespace().collect::<Vec<_>>(),
            item.split_whitespace().collect::<Vec<_>>()
        );
        assert_eq!(
            wrap("averyveryverylongword x", 8, "  "),
            "averyveryverylongword\n  x"
        );
        assert_eq!(wrap("", 8, "  "), "");
    }

    #[test]
    fn checkpatch_terse_output_is_parsed() {
        let out = "0001-x.patch:12: WARNING:FILE_PATH_CHANGES: added, moved or deleted file(s), does MAINTAINERS need updating?\n\
                   0001-x.patch:40: CHECK:PARENTHESIS_ALIGNMENT: Alignment should match open parenthesis\n\
                   0001-x.patch:41: ERROR:TRAILING_WHITESPACE: trailing whitespace\n\
                   total: 1 errors, 1 warnings, 1 checks, 90 lines checked\n";
        let f = parse_checkpatch("0001-x.patch", out);
        assert_eq!(f.len(), 3);
        assert_eq!(
            (f[0].level.as_str(), f[0].kind.as_str()),
            ("WARNING", "FILE_PATH_CHANGES")
        );
        assert_eq!(f[2].level, "ERROR");
        assert_eq!(f[1].text, "Alignment should match open parenthesis");
    }

    #[test]
    fn messages_need_a_subject_and_a_separator() {
        let p = Path::new("p");
        assert_eq!(
            message(
                "Subject: [PATCH] x86/coco: Do it\n\nWhy.\n\n---\n--- a/f\n",
                p
            )
            .unwrap(),
            "x86/coco: Do it\n\nWhy.\n"
        );
        assert!(message("x86/coco: Do it\n---\n", p).is_err());
        assert!(message("Subject: [PATCH] x\n", p).is_err());
    }
}
