//! The node-side loader against a real containerd started by the test.

mod support;

use support::containerd::Containerd;

#[test]
fn harness_starts_and_stops_containerd() {
    let Some(c) = Containerd::start() else { return };
    let out = c.ctr_ok(&["version"]);
    assert!(out.contains("Server:"), "{out}");
    let plugins = c.ctr_ok(&["plugins", "ls"]);
    assert!(plugins.lines().any(|l| l.contains("io.containerd.grpc.v1") && l.contains(" cri ") && l.contains(" ok")), "{plugins}");
    let dir = c.dir().to_path_buf();
    drop(c);
    assert!(!dir.exists());
}
