//! Running a binary under test so that it cannot read anything outside the repository.
//!
//! The suite must pass on a fresh clone with nothing installed. A test that quietly reads a
//! system dataset (`/usr/share/datasets/…`) or a sibling checkout (`../shared`) passes on the
//! developer's machine and fails everywhere else; run under [`confined`], it fails here too.
//!
//! On Linux the child is confined with Landlock (an unprivileged kernel access control, Linux
//! 5.19+): it may read the repository, the fixture directory, its own binary's directory and the
//! system files a dynamically linked program needs (`/usr/lib`, `/lib*`, `/etc`, `/proc`, `/sys`,
//! `/dev`, and the Vulkan driver manifests in `/usr/share/vulkan`), and read and write the
//! temporary directory where the tests make their files. Every other open fails with "permission
//! denied". Where Landlock is missing (another OS, an old kernel) the command runs unconfined and
//! a note says so once.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// Directories the confined child may read (and, for the libraries, execute from).
fn readable(program: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![repo_root(), super::fixture_dir()];
    dirs.extend(program.parent().map(Path::to_path_buf));
    dirs.extend(["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc", "/proc", "/sys", "/dev"].map(PathBuf::from));
    // The Vulkan loader's driver manifests (`icd.d`), for the GPU tests (`DINO_TEST_DEVICE`).
    dirs.push(PathBuf::from("/usr/share/vulkan"));
    dirs
}

/// `Command::new(program)`, confined to the repository as the module documentation says.
pub fn confined(program: &Path) -> Command {
    let mut command = Command::new(program);
    #[cfg(target_os = "linux")]
    match landlock_ruleset(program) {
        Ok(ruleset) => {
            let mut ruleset = Some(ruleset);
            // SAFETY: the closure runs in the forked child before exec. It only calls
            // `restrict_self`, which makes two system calls (prctl, landlock_restrict_self) and
            // allocates nothing, on a ruleset built in the parent.
            unsafe {
                use std::os::unix::process::CommandExt;
                command.pre_exec(move || {
                    let ruleset = ruleset.take().expect("pre_exec runs once per spawn");
                    ruleset.restrict_self().map(drop).map_err(std::io::Error::other)
                });
            }
        }
        Err(e) => warn_unconfined(&e.to_string()),
    }
    #[cfg(not(target_os = "linux"))]
    warn_unconfined("Landlock is Linux-only");
    command
}

fn warn_unconfined(why: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("note: binaries under test run unconfined ({why})"));
}

#[cfg(target_os = "linux")]
fn landlock_ruleset(program: &Path) -> Result<landlock::RulesetCreated, landlock::RulesetError> {
    use landlock::{
        ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr, path_beneath_rules,
    };
    // ABI 2 (Linux 5.19) is needed: under ABI 1 every rename across directories is refused.
    let abi = ABI::V2;
    let existing = |dirs: Vec<PathBuf>| dirs.into_iter().filter(|d| d.exists()).collect::<Vec<_>>();
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(existing(readable(program)), AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(existing(vec![std::env::temp_dir()]), AccessFs::from_all(abi)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cat` (a system binary) shows the rules at work: the repository reads, `/usr/share` does not.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_confined_child_reads_the_repository_and_nothing_outside() {
        let Some(cat) = ["/usr/bin/cat", "/bin/cat"].into_iter().map(Path::new).find(|p| p.is_file()) else {
            return;
        };
        if landlock_ruleset(cat).is_err() {
            eprintln!("Landlock unavailable here: nothing to check");
            return;
        }
        let inside = confined(cat).arg(repo_root().join("Cargo.toml")).output().unwrap();
        assert!(inside.status.success(), "{}", String::from_utf8_lossy(&inside.stderr));
        // Any file under /usr/share (not a link into /usr/lib): outside every tree the child may read.
        let outside = std::fs::read_dir("/usr/share")
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
            .filter_map(|e| e.path().canonicalize().ok())
            .find(|p| {
                p.starts_with("/usr/share")
                    && !p.starts_with("/usr/share/vulkan")
                    && p.is_file()
                    && std::fs::File::open(p).is_ok()
            });
        if let Some(outside) = outside {
            let out = confined(cat).arg(&outside).output().unwrap();
            assert!(!out.status.success(), "{} was readable", outside.display());
            assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
        }
    }
}
