//! The suite needs nothing outside the repository. The binaries the tests run are confined to
//! it at run time (`dino_fixtures::sandbox`); this test covers the code that runs inside the test
//! processes themselves: no test names a path outside the repository (a system dataset, a
//! sibling checkout such as `../shared`, a home directory).

use std::path::{Path, PathBuf};

use dino_fixtures::sandbox::repo_root;

/// Top-level directories of a Unix system that a test must not read from. `/tmp` (the tests'
/// scratch space), `/dev`, `/proc` and `/sys` are fine, and so is a path that exists nowhere,
/// such as `/nonexistent.pth` in the bad-input tests.
const SYSTEM_DIRS: [&str; 16] = [
    "bin", "boot", "etc", "home", "lib", "lib64", "media", "mnt", "opt", "root", "run", "sbin", "srv", "usr", "var",
    "work",
];

/// Places that only exist next to one developer's checkout.
const SIBLINGS: [&str; 3] = ["../shared", "shared/fixtures", "shared/images"];

/// The files that name such paths on purpose: the sandbox's allow list, and this test.
const EXEMPT: [&str; 2] = ["crates/dino-fixtures/src/sandbox.rs", "crates/dino-fixtures/tests/self_contained.rs"];

/// String literals of Rust source, in order (plain and raw strings; comments and char literals
/// skipped).
fn string_literals(src: &str) -> Vec<String> {
    let b = src.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => i = src[i..].find('\n').map_or(b.len(), |n| i + n),
            b'/' if b.get(i + 1) == Some(&b'*') => i = src[i + 2..].find("*/").map_or(b.len(), |n| i + n + 4),
            // A char literal ('"', '\'', 'x'); a lifetime ('a) is left alone.
            b'\'' if b.get(i + 1) == Some(&b'\\') => i += src[i + 2..].find('\'').map_or(b.len(), |n| n + 3),
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#')) && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) => {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let start = i + 1 + hashes + 1;
                let end = format!("\"{}", "#".repeat(hashes));
                let len = src[start..].find(&end).unwrap_or(src.len() - start);
                out.push(src[start..start + len].to_string());
                i = start + len + end.len();
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                out.push(src[i + 1..j.min(b.len())].to_string());
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// Why a literal reaches outside the repository, if it does.
fn outside(literal: &str) -> Option<&'static str> {
    if let Some(sibling) = SIBLINGS.iter().find(|s| literal.contains(*s)) {
        return Some(sibling);
    }
    let first = literal.strip_prefix('/')?.split('/').next()?;
    SYSTEM_DIRS.iter().find(|d| **d == first).map(|_| "an absolute system path")
}

/// The test code of a source file: all of a file under `tests/`, the part of a `src/` file
/// from its first `#[cfg(test)]` on.
fn test_code(path: &Path, text: &str) -> Option<String> {
    if path.components().any(|c| c.as_os_str() == "tests") {
        return Some(text.to_string());
    }
    text.find("#[cfg(test)]").map(|at| text[at..].to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_scanner_finds_paths_outside_the_repository() {
    let src = r##"
        // "/usr/share/datasets/in-a-comment" is fine
        let c = '"'; let q = '\'';
        let ok = ["/nonexistent.pth", "fixtures/fashion-mnist-subset", "/tmp/x", "/dev/null"];
        let bad = "/usr/share/datasets/fashion-mnist";
        let raw = r#"../shared/images/cat.png"#;
    "##;
    let literals = string_literals(src);
    assert!(literals.contains(&"/nonexistent.pth".to_string()), "{literals:?}");
    let flagged: Vec<&str> = literals.iter().map(String::as_str).filter(|l| outside(l).is_some()).collect();
    assert_eq!(flagged, ["/usr/share/datasets/fashion-mnist", "../shared/images/cat.png"]);
}

#[test]
fn no_test_names_a_path_outside_the_repository() {
    let root = repo_root();
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    let (mut scanned, mut literals, mut found) = (0, 0, Vec::new());
    for path in files {
        let relative = path.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
        if EXEMPT.contains(&relative.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let Some(code) = test_code(&path, &text) else { continue };
        scanned += 1;
        for literal in string_literals(&code) {
            literals += 1;
            if let Some(why) = outside(&literal) {
                found.push(format!("{relative}: \"{literal}\" ({why})"));
            }
        }
    }
    // The scan itself must have seen the suite: every crate has tests.
    assert!(scanned >= 15 && literals >= 300, "scanned {scanned} files, {literals} literals");
    assert!(
        found.is_empty(),
        "tests must read only the repository (fixtures/ has the reference fixtures and a Fashion-MNIST subset):\n{}",
        found.join("\n")
    );
}
