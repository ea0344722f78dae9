//! Codebase rules as ordinary tests (rust-analyzer's "tidy"): every module
//! says what it owns, and library code does not `unwrap()`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "xtask/src", "images"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found only {} source files", files.len());
    files
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let missing: Vec<_> =
        sources().into_iter().filter(|p| !std::fs::read_to_string(p).unwrap().starts_with("//!")).collect();
    assert!(missing.is_empty(), "modules without a leading `//!` doc comment: {missing:?}");
}

#[test]
fn no_unwrap_outside_tests() {
    let mut offenders = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests live at the end of a file, after `#[cfg(test)]`.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for (n, line) in code.lines().enumerate() {
            if line.contains(".unwrap()") && !line.trim_start().starts_with("//") {
                offenders.push(format!("{}:{}", path.display(), n + 1));
            }
        }
    }
    assert!(offenders.is_empty(), "use `?` or `expect(\"why\")` instead of unwrap(): {offenders:?}");
}

/// The node side (load, place, serve, and the partition reading they share
/// with inspect and diff) runs on every node at boot: it must not pull in the build side.
#[test]
fn node_side_imports_nothing_from_the_build_side() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src/load", "src/place", "src/serve"] {
        if root.join(dir).is_dir() {
            rust_files(&root.join(dir), &mut files);
        }
    }
    for f in ["inspect.rs", "mount.rs", "index.rs", "open.rs", "verity_open.rs"] {
        files.push(root.join("src/partition").join(f));
    }
    // `preseed diff` reads partitions as the node side does.
    files.push(root.join("src/diff.rs"));
    let build_side = ["bundle", "resolve", "fetch", "manifest", "build", "layout", "verify"];
    let mut offenders = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        for (n, line) in code.lines().enumerate() {
            if build_side
                .iter()
                .any(|m| line.contains(&format!("crate::{m}::")) || line.contains(&format!("crate::{m};")))
            {
                offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "node-side code importing the build side: {offenders:#?}");
    // Import drives unpack, never the other way round.
    let unpack = std::fs::read_to_string(root.join("src/load/unpack.rs")).unwrap();
    assert!(!unpack.contains("super::import"), "src/load/unpack.rs imports src/load/import.rs");
}
