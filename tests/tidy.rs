//! Codebase rules as ordinary tests (rust-analyzer's "tidy"): every module
//! says what it owns, library code does not `unwrap()`, the two wings stand
//! on the floor without reaching into each other, no modules import each
//! other in a circle, every `unsafe` says why it is sound, the node wing's
//! syscalls sit behind its seam, and ARCHITECTURE.md names what exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

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

fn files_under(dirs: &[&str]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in dirs {
        rust_files(&root().join(dir), &mut files);
    }
    files.sort();
    files
}

fn sources() -> Vec<PathBuf> {
    let files = files_under(&["src", "xtask/src", "images"]);
    assert!(files.len() > 20, "found only {} source files", files.len());
    files
}

/// The code of a file before its unit tests (they sit at the end, after
/// `#[cfg(test)]`), without comment lines.
fn code(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap();
    code.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(n, l)| (n + 1, l.to_string()))
        .collect()
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root()).unwrap().display().to_string()
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
        for (n, line) in code(&path) {
            if line.contains(".unwrap()") {
                offenders.push(format!("{}:{n}", rel(&path)));
            }
        }
    }
    assert!(offenders.is_empty(), "use `?` or `expect(\"why\")` instead of unwrap(): {offenders:?}");
}

/// Which part of the library a file belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Shared by both wings: digest, oci, human, parallel, partition, trust.
    Floor,
    /// `src/build/`.
    Build,
    /// `src/node/`.
    Node,
    /// lib.rs, cli.rs, main.rs: above both wings.
    Top,
}

fn part(path: &Path) -> Part {
    let r = path.strip_prefix(root().join("src")).unwrap();
    match r.components().next().unwrap().as_os_str().to_str().unwrap() {
        "build" => Part::Build,
        "node" => Part::Node,
        "lib.rs" | "cli.rs" | "main.rs" => Part::Top,
        _ => Part::Floor,
    }
}

/// The node wing runs on every node at boot: it must not pull in the build
/// wing; the build wing does not use the node's code either; the floor both
/// stand on uses neither. A rule about folders, not file names.
#[test]
fn the_wings_stand_on_the_floor_and_not_on_each_other() {
    let mut offenders = Vec::new();
    for path in files_under(&["src"]) {
        let p = part(&path);
        let forbidden: &[&str] = match p {
            Part::Floor => &["build", "node"],
            Part::Build => &["node"],
            Part::Node => &["build"],
            Part::Top => &[],
        };
        for (n, line) in code(&path) {
            for m in forbidden {
                let group = line.contains("crate::{")
                    && line.split("crate::{").nth(1).is_some_and(|g| {
                        g.split([',', '}']).any(|item| item.trim() == *m || item.trim().starts_with(&format!("{m}::")))
                    });
                if line.contains(&format!("crate::{m}::")) || line.contains(&format!("crate::{m};")) || group {
                    offenders.push(format!("{} ({p:?}):{n}: {}", rel(&path), line.trim()));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "imports across the wings: {offenders:#?}");
}

/// The module path of a source file under `base` (`node/read/archive.rs` →
/// `node::read::archive`; a `mod.rs`, `lib.rs` or `main.rs` is its folder).
fn module_of(base: &Path, file: &Path) -> Vec<String> {
    let r = file.strip_prefix(base).unwrap();
    let mut parts: Vec<String> = r.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    if !["mod.rs", "lib.rs", "main.rs"].contains(&last.as_str()) {
        parts.push(last.trim_end_matches(".rs").to_string());
    }
    parts
}

/// Module-to-module references of a crate: `crate::a::b` and `super::c`
/// paths in each file's code, cut to the longest known module.
/// A module's path, e.g. `["node", "read", "archive"]`.
type ModulePath = Vec<String>;

fn references(base: &Path) -> Vec<(ModulePath, ModulePath)> {
    let mut files = Vec::new();
    rust_files(base, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(base, f)).collect();
    let mut refs = Vec::new();
    for f in &files {
        let from = module_of(base, f);
        // `super` is the parent of the file's module (a mod.rs's module is its folder).
        let parent = from[..from.len().saturating_sub(1)].to_vec();
        for (_, line) in code(f) {
            for (prefix, start) in [("crate::", Vec::new()), ("super::", parent.clone())] {
                let mut rest = line.as_str();
                while let Some(at) = rest.find(prefix) {
                    // Not part of a longer path (`foo::crate::`) or identifier.
                    let before = rest[..at].chars().last();
                    rest = &rest[at + prefix.len()..];
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                        continue;
                    }
                    let path: Vec<String> = rest
                        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .next()
                        .unwrap_or("")
                        .split("::")
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect();
                    let mut target = start.clone();
                    target.extend(path);
                    // `crate::{a, b}` groups.
                    if let Some(group) = rest.strip_prefix('{') {
                        let group = group.split('}').next().unwrap_or("");
                        for item in group.split(',') {
                            let mut t = start.clone();
                            t.extend(item.trim().split("::").filter(|s| !s.is_empty()).map(String::from));
                            refs.push((from.clone(), longest_module(&modules, &t)));
                        }
                        continue;
                    }
                    refs.push((from.clone(), longest_module(&modules, &target)));
                }
            }
        }
    }
    refs
}

fn longest_module(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Vec<String> {
    (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains(p)).unwrap_or_default()
}

/// Cycles among sibling modules: a reference from `a::x…` to `a::y…` is an
/// edge x → y under parent `a` (references to an ancestor or descendant are
/// not edges: a folder's mod.rs and its files work together).
fn sibling_cycles(base: &Path) -> Vec<String> {
    let refs = references(base);
    let mut edges: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, to) in refs {
        let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == to.len() {
            continue;
        }
        let parent = from[..common].to_vec();
        edges.entry(parent).or_default().entry(from[common].clone()).or_default().insert(to[common].clone());
    }
    let mut cycles = Vec::new();
    for (parent, graph) in &edges {
        // Depth-first search for a back edge, reporting the circle it closes.
        fn visit(
            n: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            out: &mut Vec<Vec<String>>,
        ) {
            if let Some(at) = stack.iter().position(|s| s == n) {
                let mut c = stack[at..].to_vec();
                c.push(n.to_string());
                out.push(c);
                return;
            }
            if !done.insert(n.to_string()) {
                return;
            }
            stack.push(n.to_string());
            for next in graph.get(n).into_iter().flatten() {
                visit(next, graph, stack, done, out);
            }
            stack.pop();
        }
        let mut found = Vec::new();
        let mut done = BTreeSet::new();
        for n in graph.keys() {
            visit(n, graph, &mut Vec::new(), &mut done, &mut found);
        }
        for c in found {
            cycles.push(format!(
                "{}: {}",
                if parent.is_empty() { "crate".into() } else { parent.join("::") },
                c.join(" → ")
            ));
        }
    }
    cycles
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    for crate_src in ["src", "xtask/src"] {
        let cycles = sibling_cycles(&root().join(crate_src));
        assert!(cycles.is_empty(), "import circles in {crate_src}: {cycles:#?}");
    }
}

/// The checker itself finds a circle (so the test above can fail).
#[test]
fn the_circle_checker_sees_a_circle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::write(dir.path().join("lib.rs"), "mod a; mod b;").unwrap();
    std::fs::write(dir.path().join("a/mod.rs"), "use crate::b::Thing;\nuse super::x;").unwrap();
    std::fs::write(dir.path().join("a/inner.rs"), "use super::Other;").unwrap();
    std::fs::write(dir.path().join("b.rs"), "use crate::{digest, a::inner::Other};").unwrap();
    let cycles = sibling_cycles(dir.path());
    assert_eq!(cycles, ["crate: a → b → a"], "{cycles:?}");
}

/// Every `unsafe` block, fn or impl has a `// SAFETY:` comment on the lines
/// just above it (or its own line), in the crates, the tests and examples.
#[test]
fn every_unsafe_says_why_it_is_sound() {
    let mut offenders = Vec::new();
    for path in files_under(&["src", "xtask/src", "images", "tests", "examples"]) {
        if path.ends_with("tests/tidy.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let l = line.trim_start();
            if l.starts_with("//") || !(l.contains("unsafe {") || l.contains("unsafe fn") || l.contains("unsafe impl"))
            {
                continue;
            }
            let said = lines[i.saturating_sub(4)..=i].iter().any(|l| l.contains("SAFETY:"));
            if !said {
                offenders.push(format!("{}:{}: {}", rel(&path), i + 1, l));
            }
        }
    }
    assert!(offenders.is_empty(), "unsafe without a `// SAFETY:` comment: {offenders:#?}");
}

/// The node wing's syscalls go through its seam (`node::sys::Sys`), so
/// tests can swap them and every `unsafe` of the wing is in one file.
#[test]
fn the_node_wing_makes_syscalls_only_through_its_seam() {
    let mut offenders = Vec::new();
    for path in files_under(&["src/node"]) {
        if path.ends_with("src/node/sys.rs") {
            continue;
        }
        for (n, line) in code(&path) {
            if line.contains("unsafe") {
                offenders.push(format!("{}:{n}: {}", rel(&path), line.trim()));
            }
        }
    }
    assert!(offenders.is_empty(), "node-wing code outside src/node/sys.rs making syscalls: {offenders:#?}");
}

/// ARCHITECTURE.md stays true to the tree: every path it names exists, and
/// every module of the floor and of each wing has its entry.
#[test]
fn architecture_md_names_what_exists_and_every_module() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    for quoted in text.split('`').skip(1).step_by(2) {
        let first = quoted.split_whitespace().next().unwrap_or("");
        let is_path = ["src/", "tests/", "xtask/", "examples/", "dist/", "docs/", "images/", "fuzz/"]
            .iter()
            .any(|p| first.starts_with(p));
        if !is_path || first.contains(['*', '<', '{']) {
            continue;
        }
        if !root().join(first.trim_end_matches(['.', ',', ':', ')'])).exists() {
            missing.push(first.to_string());
        }
    }
    assert!(missing.is_empty(), "ARCHITECTURE.md names paths that do not exist: {missing:?}");

    // The top-level modules and every folder of the floor and the wings by
    // path; every file deeper down by its name, in its folder's entry.
    let mut unlisted = Vec::new();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut named: BTreeSet<String> = BTreeSet::new();
    for f in &files {
        let r = rel(f);
        let depth = r.matches('/').count();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if ["mod.rs", "lib.rs", "main.rs"].contains(&name.as_str()) {
            continue;
        }
        if depth <= 1 {
            named.insert(r);
        } else if !text.contains(&format!("`{name}`")) && !text.contains(&format!("`{r}`")) {
            unlisted.push(r);
        }
    }
    for dir in ["src", "src/build", "src/node"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                named.insert(format!("{}/", rel(&p)));
            }
        }
    }
    named.retain(|m| m.matches('/').count() <= 2 || m.ends_with('/'));
    unlisted.extend(named.into_iter().filter(|m| !text.contains(&format!("`{m}`"))));
    assert!(unlisted.is_empty(), "modules without an entry in ARCHITECTURE.md's code map: {unlisted:?}");
}
