//! The user's contract in `docs/` kept true to the code: real `preseed.json`
//! output validates against `docs/preseed.schema.json`, the systemd files of
//! `dist/systemd/` appear verbatim in `docs/node.md`, every link in the
//! README and `docs/` stays inside the repository and resolves, and every
//! subcommand and long flag of the command line is documented in
//! `docs/commands.md`.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use support::cli::{ok, preseed};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// README.md and every `docs/*.md`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 6, "docs/ has only {docs:?}");
    files.extend(docs);
    files
}

/// A fenced code block: its info string (`ini`, `toml`, …) and its lines.
struct Fence {
    info: String,
    body: String,
}

/// Splits markdown into prose (code blocks blanked, so line numbers stay)
/// and its fenced code blocks. A fence indented in a list item has that
/// indentation removed from its lines, as markdown does.
fn split_fences(text: &str) -> (String, Vec<Fence>) {
    let mut prose = String::new();
    let mut fences = Vec::new();
    let mut open: Option<(usize, Fence)> = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start_matches(' ');
        let indent = line.len() - trimmed.len();
        match &mut open {
            None if trimmed.starts_with("```") => {
                open = Some((indent, Fence { info: trimmed[3..].trim().to_string(), body: String::new() }));
                prose.push('\n');
            }
            None => prose.push_str(line),
            Some(_) if trimmed.trim_end() == "```" => {
                fences.extend(open.take().map(|(_, f)| f));
                prose.push('\n');
            }
            Some((fence_indent, f)) => {
                f.body.push_str(&line[indent.min(*fence_indent)..]);
                prose.push('\n');
            }
        }
    }
    assert!(open.is_none(), "unclosed code block");
    (prose, fences)
}

/// Removes inline code spans, which hold no links.
fn strip_inline_code(line: &str) -> String {
    let mut out = String::new();
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        }
    }
    out
}

fn bundle(out: &Path, extra: &[&str]) -> serde_json::Value {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docs-cache");
    let mut args = vec![
        "bundle".to_string(),
        "--no-progress".into(),
        "--offline".into(),
        "--manifest".into(),
        root().join("bundles.toml").display().to_string(),
        "--workspace".into(),
        root().display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--cache".into(),
        cache.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(&format!("preseed {args:?}"), &preseed(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    serde_json::from_str(&read(&out.join("preseed.json"))).unwrap()
}

fn schema() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(&read(&root().join("docs/preseed.schema.json"))).unwrap();
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("docs/preseed.schema.json: {e}"))
}

fn assert_valid(schema: &jsonschema::Validator, what: &str, index: &serde_json::Value) {
    let errors: Vec<String> = schema.iter_errors(index).map(|e| format!("{}: {e}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{what} does not match docs/preseed.schema.json:\n{}\n{index:#}", errors.join("\n"));
}

/// The in-tree bundles.toml (pause and hello, built from this workspace),
/// bundled offline without and with `--verity`: what a user gets from
/// `cargo xtask bundle` on a fresh clone.
#[test]
fn real_preseed_json_matches_the_schema() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();

    let plain = bundle(&dir.path().join("plain"), &[]);
    assert_valid(&schema, "preseed.json", &plain);
    assert!(plain.get("verity").is_none());
    // The copy inside the partition is the same document (a directory is a partition too).
    let index = dir.path().join("plain/preseed.json");
    let inspected = ok("preseed inspect", &preseed(&["inspect", "--json", index.to_str().unwrap()]));
    assert_valid(&schema, "inspect --json", &serde_json::from_str(&inspected).unwrap());

    let verity = bundle(&dir.path().join("verity"), &["--verity"]);
    assert_valid(&schema, "preseed.json with --verity", &verity);
    let root_hash = read(&dir.path().join("verity/preseed.roothash"));
    assert_eq!(verity["verity"]["root_hash"].as_str(), Some(root_hash.trim()));

    // A schema that accepts anything would pass the above: misspelled,
    // missing or mistyped fields must be refused, at every level.
    let mut bad = verity.clone();
    bad["images"][0]["sandbx"] = true.into();
    assert!(!schema.is_valid(&bad), "schema accepts a misspelled image field");
    let mut bad = verity.clone();
    bad["verity"]["roothash"] = "00".into();
    assert!(!schema.is_valid(&bad), "schema accepts a misspelled verity field");
    let mut bad = plain.clone();
    bad["build"].as_object_mut().unwrap().remove("tool");
    assert!(!schema.is_valid(&bad), "schema accepts a build without tool");
    let mut bad = plain.clone();
    bad["images"][0]["digest"] = "sha256:xyz".into();
    assert!(!schema.is_valid(&bad), "schema accepts a malformed digest");
    let mut bad = plain.clone();
    bad["images"][0]["blobs"] = serde_json::json!([{ "digest": plain["images"][0]["digest"], "size": "1" }]);
    assert!(!schema.is_valid(&bad), "schema accepts a blob size that is not a number");
    // The optional per-image fields are accepted when present.
    let mut full = plain.clone();
    full["images"][0]["blobs"] = serde_json::json!([{ "digest": plain["images"][0]["digest"], "size": 1 }]);
    full["images"][0]["signed_by"] = serde_json::json!({
        "key": "keys/release.pub",
        "key_sha256": plain["images"][0]["sha256"],
        "format": "sigstore-bundle",
    });
    assert_valid(&schema, "preseed.json with blobs and signed_by", &full);
}

/// The rule: every file under `dist/systemd/` appears in docs/node.md as an
/// ```` ```ini ```` block whose first line is a comment naming where it goes
/// — `# /usr/lib/systemd/system/<path>` or `# /etc/systemd/system/<path>`,
/// `<path>` being its path under `dist/systemd/` — followed by exactly the
/// file's bytes. Every block naming such a path must be that copy.
#[test]
fn systemd_files_appear_verbatim_in_node_md() {
    let (_, fences) = split_fences(&read(&root().join("docs/node.md")));
    let dist = root().join("dist/systemd");
    let mut files = Vec::new();
    let mut dirs = vec![dist.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 5, "dist/systemd holds only {files:?}");
    let mut problems = Vec::new();
    for file in files {
        let name = file.strip_prefix(&dist).unwrap().display().to_string();
        let content = read(&file);
        let headers = [format!("# /usr/lib/systemd/system/{name}\n"), format!("# /etc/systemd/system/{name}\n")];
        let copies: Vec<&str> = fences
            .iter()
            .filter(|f| f.info == "ini")
            .filter_map(|f| headers.iter().find_map(|h| f.body.strip_prefix(h.as_str())))
            .collect();
        if copies.is_empty() {
            problems.push(format!("dist/systemd/{name}: no ```ini block starting with `{}`", headers[0].trim()));
        }
        for copy in copies {
            if copy != content {
                problems.push(format!("dist/systemd/{name}: docs/node.md shows\n{copy}\nbut the file is\n{content}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces
/// to `-`; a repeated heading gets `-1`, `-2`, ….
fn anchors(markdown: &str) -> BTreeSet<String> {
    let (prose, _) = split_fences(markdown);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for line in prose.lines() {
        let Some(heading) = line.strip_prefix('#') else { continue };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 { slug.clone() } else { format!("{slug}-{n}") });
        *n += 1;
    }
    out
}

/// Every `[text](target)` (and `<a href="target">`) in prose, with its line.
fn links(markdown: &str) -> Vec<(usize, String)> {
    let (prose, _) = split_fences(markdown);
    let mut out = Vec::new();
    for (n, line) in prose.lines().enumerate() {
        let line = strip_inline_code(line);
        let mut rest = line.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            out.push((n + 1, rest[..end].trim().to_string()));
        }
        let mut rest = line.as_str();
        while let Some(i) = rest.find("href=\"") {
            rest = &rest[i + 6..];
            let end = rest.find('"').unwrap_or(rest.len());
            out.push((n + 1, rest[..end].to_string()));
        }
        // Bare addresses become links on GitHub too.
        for scheme in ["http://", "https://"] {
            if line.contains(scheme) {
                out.push((n + 1, scheme.to_string()));
            }
        }
    }
    out
}

#[test]
fn links_stay_in_the_repository_and_resolve() {
    let root = root().canonicalize().unwrap();
    let mut problems = Vec::new();
    for file in markdown_files() {
        let text = read(&file);
        let shown = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
        for (line, link) in links(&text) {
            let at = format!("{shown}:{line}: ({link})");
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            if path.contains(':') || path.starts_with('/') || path.starts_with("//") {
                problems.push(format!("{at}: links go to files of this repository only, by relative path"));
                continue;
            }
            let target = if path.is_empty() { file.clone() } else { file.parent().unwrap().join(path) };
            let Ok(target) = target.canonicalize() else {
                problems.push(format!("{at}: no such file"));
                continue;
            };
            if !target.starts_with(&root) {
                problems.push(format!("{at}: outside the repository"));
                continue;
            }
            if !anchor.is_empty() {
                let is_md = target.extension().is_some_and(|e| e == "md");
                if !is_md || !anchors(&read(&target)).contains(anchor) {
                    problems.push(format!("{at}: no heading #{anchor} in {}", target.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `word` occurs in `text` as a whole word (`--verity` is not found in `--verity-root-hash`).
fn mentions(text: &str, word: &str) -> bool {
    let part = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    text.match_indices(word)
        .any(|(i, _)| !part(text[..i].chars().next_back()) && !part(text[i + word.len()..].chars().next()))
}

/// A new subcommand or flag without a word in docs/commands.md fails here.
#[test]
fn every_subcommand_and_flag_is_in_commands_md() {
    let docs = read(&root().join("docs/commands.md"));
    let cli = preseed::cli::Cli::command();
    let mut missing = Vec::new();
    let mut subcommands = 0;
    for sub in cli.get_subcommands() {
        let name = sub.get_name();
        subcommands += 1;
        if !docs.contains(&format!("## `preseed {name}")) {
            missing.push(format!("a `## `preseed {name}` section"));
        }
        // Each flag is looked for in its subcommand's section.
        let section = docs.split("\n## ").find(|s| s.starts_with(&format!("`preseed {name}"))).unwrap_or_default();
        for arg in sub.get_arguments() {
            let long = match (arg.get_long(), arg.is_positional()) {
                (Some(l), _) => format!("--{l}"),
                (None, true) => arg
                    .get_value_names()
                    .and_then(|v| v.first())
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| arg.get_id().to_string().to_uppercase()),
                (None, false) => continue,
            };
            if long == "--help" || long == "--version" {
                continue;
            }
            if !mentions(section, &long) {
                missing.push(format!("preseed {name} `{long}`"));
            }
        }
    }
    assert!(subcommands >= 6, "only {subcommands} subcommands");
    assert!(missing.is_empty(), "docs/commands.md does not document: {missing:?}");
}
