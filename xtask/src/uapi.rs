//! Checks the patched uapi headers against the `hypercall` crate: bindgen
//! turns the kernel tree's `<linux/kvm_para.h>` into Rust constants, which
//! must equal the crate's. The same run checks the VMM's copy of the
//! uapi of our KVM patches (`<linux/kvm.h>`: capability numbers and the
//! populate structure's layout, host/vmm/src/gmem_kvm.rs), which
//! kvm-bindings does not have. (The in-kernel KUnit suite `kvm_protmem_abi`
//! makes the same comparison through the kernel's own bindings.)

use crate::kernel::Kernel;
use crate::setup::Tools;
use crate::sh;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::process::Command;

/// Parses `pub const NAME: TYPE = VALUE;` lines of bindgen output.
pub fn parse_consts(rs: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for l in rs.lines() {
        let Some(rest) = l.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((_, value)) = rest.split_once('=') else {
            continue;
        };
        let v = value.trim().trim_end_matches(';').trim();
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse::<u64>().ok(),
        };
        if let Some(n) = parsed {
            m.insert(name.trim().to_string(), n);
        }
    }
    m
}

/// The names and values the uapi headers must carry, from the crate.
pub fn expected() -> Vec<(&'static str, u64)> {
    use hypercall::*;
    vec![
        ("KVM_HC_ENABLE_MEM_PROTECTED", KVM_HC_ENABLE_MEM_PROTECTED),
        ("KVM_HC_MEM_SHARE", KVM_HC_MEM_SHARE),
        ("KVM_HC_MEM_UNSHARE", KVM_HC_MEM_UNSHARE),
        (
            "KVM_FEATURE_MEM_PROTECTED",
            u64::from(KVM_FEATURE_MEM_PROTECTED),
        ),
        ("KVM_CPUID_SIGNATURE", u64::from(KVM_CPUID_SIGNATURE)),
        ("KVM_CPUID_FEATURES", u64::from(KVM_CPUID_FEATURES)),
        ("KVM_ENOSYS", KVM_ENOSYS),
        ("KVM_EINVAL", KVM_EINVAL),
        ("KVM_EFAULT", KVM_EFAULT),
        ("KVM_EPERM", KVM_EPERM),
        ("KVM_ENOMEM", KVM_ENOMEM),
        (
            "KVM_CAP_SW_PROTECTED_POPULATE",
            u64::from(kvm_protmem_vmm::gmem_kvm::KVM_CAP_SW_PROTECTED_POPULATE),
        ),
        // KVM_EXIT_HYPERCALL_APPLIED is a `_BITULL()` macro, which bindgen
        // does not evaluate: protmem-kvm-test checks it on the running KVM.
        (
            "KVM_CAP_X86_PROTECTED_MEMORY",
            u64::from(kvm_protmem_vmm::gmem_kvm::KVM_CAP_X86_PROTECTED_MEMORY),
        ),
    ]
}

/// The VMM's `struct kvm_sw_protected_populate` as bindgen prints it.
const POPULATE_STRUCT: &str = "pub struct kvm_sw_protected_populate {\n    \
    pub gpa: __u64,\n    pub size: __u64,\n    pub source: __u64,\n    \
    pub flags: __u64,\n    pub padding: [__u64; 4usize],\n}";

/// Runs bindgen on the tree's uapi header and compares; returns the number
/// of constants checked.
pub fn check(tools: &Tools, k: &Kernel) -> Result<usize> {
    let scratch = k.build.join("kpm-uapi-check");
    std::fs::create_dir_all(&scratch)?;
    let header = scratch.join("wrapper.h");
    std::fs::write(
        &header,
        "#include <linux/errno.h>\n#include <linux/kvm_para.h>\n#include <linux/kvm.h>\n",
    )?;
    // The raw uapi <linux/kvm.h> includes <linux/compiler.h> for `__user`,
    // which `make headers_install` strips; an empty definition stands in.
    let stub = scratch.join("stub");
    std::fs::create_dir_all(stub.join("linux"))?;
    std::fs::write(stub.join("linux/compiler.h"), "#define __user\n")?;
    let inc = |p: &std::path::Path| format!("-I{}", p.display());
    let out = sh::output(
        Command::new(&tools.bindgen)
            .arg(&header)
            .args(["--no-layout-tests", "--allowlist-var", "KVM_.*"])
            .args(["--allowlist-type", "kvm_sw_protected_populate", "--"])
            .arg(inc(&k.tree.join("arch/x86/include/uapi")))
            .arg(inc(&k.build.join("arch/x86/include/generated/uapi")))
            .arg(inc(&k.tree.join("include/uapi")))
            .arg(inc(&k.build.join("include/generated/uapi")))
            .arg(inc(&stub))
            .env("LIBCLANG_PATH", format!("/usr/lib/llvm-{}/lib", tools.llvm)),
    )
    .context("bindgen on the patched <linux/kvm_para.h> failed")?;
    let got = parse_consts(&out);
    let mut bad = Vec::new();
    for (name, want) in expected() {
        match got.get(name) {
            Some(&v) if v == want => {}
            Some(&v) => bad.push(format!("{name}: header {v}, crate {want}")),
            None => bad.push(format!("{name}: missing from the header")),
        }
    }
    if let (Some(map), Some(share)) = (got.get("KVM_HC_MAP_GPA_RANGE"), got.get("KVM_HC_MEM_SHARE"))
    {
        if map == share {
            bad.push("KVM_HC_MEM_SHARE collides with KVM_HC_MAP_GPA_RANGE".into());
        }
    }
    if !out.contains(POPULATE_STRUCT) {
        bad.push(format!(
            "struct kvm_sw_protected_populate differs from the VMM's (want:\n{POPULATE_STRUCT})"
        ));
    }
    if std::mem::size_of::<kvm_protmem_vmm::gmem_kvm::KvmSwProtectedPopulate>() != 64 {
        bad.push("the VMM's KvmSwProtectedPopulate is not 64 bytes".into());
    }
    if !bad.is_empty() {
        bail!(
            "uapi header and hypercall crate disagree:\n  {}",
            bad.join("\n  ")
        );
    }
    Ok(expected().len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bindgen_constants() {
        let rs = "pub const KVM_HC_MEM_SHARE: u32 = 14;\npub const KVM_CPUID_FEATURES: u32 = 1073741825;\n\
                  pub const X: u32 = 0x10;\npub type y = u32;\n";
        let m = parse_consts(rs);
        assert_eq!(m["KVM_HC_MEM_SHARE"], 14);
        assert_eq!(m["KVM_CPUID_FEATURES"], 0x4000_0001);
        assert_eq!(m["X"], 16);
        assert_eq!(m.len(), 3);
    }
}
