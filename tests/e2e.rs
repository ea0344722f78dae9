//! The whole product, as a node sees it: the default bundles.toml (in-tree
//! pause and hello) plus one registry image → `preseed bundle` → partition →
//! `preseed load --image` into a fresh containerd with no registry running →
//! `ctr run` of hello prints its line and a CRI pod sandbox starts offline.
#![cfg(feature = "containerd")]

mod support;

use std::path::Path;
use std::time::Instant;

use support::cli::{ok, preseed};
use support::containerd::{Containerd, ContainerdOptions};
use support::images::{self, LayerSpec, Media};
use support::registry::Registry;

const HELLO_LINE: &str = "Hello from preseed!";
const SANDBOX: &str = "preseed.local/pause:3.10";

fn load_json(partition: &Path, socket: &Path) -> (serde_json::Value, f64) {
    let start = Instant::now();
    let out =
        preseed(&["load", "--image", partition.to_str().unwrap(), "--address", socket.to_str().unwrap(), "--json"]);
    let secs = start.elapsed().as_secs_f64();
    (serde_json::from_str(&ok("preseed load", &out)).unwrap(), secs)
}

#[test]
fn default_bundle_boots_a_node_offline() {
    if !support::require_root() {
        return;
    }
    let workspace = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let partition = dir.path().join("out/preseed.erofs");
    {
        let Some(reg) = Registry::start() else { return };
        let pushed = images::push_image(&reg, "team/tool", "1.0", &[LayerSpec::new(4242, 3, 64 << 10)], Media::Oci);
        let host = reg.host();
        let mut manifest = std::fs::read_to_string(Path::new(workspace).join("bundles.toml")).unwrap();
        manifest += &format!(
            "\n[registries.\"{host}\"]\ninsecure = true\n\n[[image]]\nref = \"{host}/team/tool:1.0@{}\"\nnames = [\"registry.local/tool:1.0\"]\n",
            pushed.manifest_digest
        );
        std::fs::write(dir.path().join("bundles.toml"), manifest).unwrap();
        let d = |p: &str| dir.path().join(p).display().to_string();
        let out = preseed(&[
            "bundle",
            "--no-progress",
            "--manifest",
            &d("bundles.toml"),
            "--workspace",
            workspace,
            "--out",
            &d("out"),
            "--cache",
            &d("cache"),
        ]);
        eprintln!("{}", ok("preseed bundle", &out));
        // The registry stops here: the node has none.
    }
    // `inspect` reads the partition image itself (mounted read-only for the moment).
    let inspected: serde_json::Value =
        serde_json::from_str(&ok("preseed inspect", &preseed(&["inspect", "--json", partition.to_str().unwrap()])))
            .unwrap();
    let paths: Vec<&str> =
        inspected["images"].as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["k8s.io/pause.tar", "k8s.io/hello.tar", "k8s.io/tool.tar"]);
    assert_eq!(inspected["images"][0]["sandbox"], true);
    let human = ok("preseed inspect", &preseed(&["inspect", partition.to_str().unwrap()]));
    assert!(human.contains("k8s.io/hello.tar") && human.contains("also registry.local/tool:1.0"), "{human}");

    let opts = ContainerdOptions { sandbox_image: SANDBOX.into(), ..Default::default() };
    let Some(c) = Containerd::start_with(opts) else { return };

    let (cold, cold_secs) = load_json(&partition, c.socket());
    eprintln!("cold load: {cold_secs:.3}s\n{cold}");
    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls"]);
    for name in [SANDBOX, "preseed.local/hello:0.1", "registry.local/tool:1.0"] {
        let row = listed
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in\n{listed}"));
        assert!(row.contains("io.cri-containerd.pinned=pinned"), "{row}");
    }

    let out = c.ctr_ok(&["-n", "k8s.io", "run", "--rm", "preseed.local/hello:0.1", "e2e-hello"]);
    assert!(out.contains(HELLO_LINE), "hello printed {out:?}");

    // The first pod starts with no registry anywhere: its sandbox image is local.
    support::cri::run_host_network_pod_sandbox(c.socket(), || c.log());

    // Second boot: nothing to import, every pin kept.
    let (warm, warm_secs) = load_json(&partition, c.socket());
    eprintln!("warm load: {warm_secs:.3}s ({:.1}% of cold)", 100.0 * warm_secs / cold_secs);
    let images = warm["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    for i in images {
        assert_eq!(i["outcome"], "already_present", "{i}");
        assert_eq!(i["bytes_written"], 0, "{i}");
    }
    let listed = c.ctr_ok(&["-n", "k8s.io", "images", "ls"]);
    assert!(listed.matches("io.cri-containerd.pinned=pinned").count() >= 3, "{listed}");
}
