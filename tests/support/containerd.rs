//! A real containerd (with runc) started by a test in a temp dir.
//!
//! Each [`Containerd`] has its own root, state, gRPC socket (no TCP) and CRI
//! plugin configuration, so tests run side by side and never touch the
//! machine's containerd. Dropping it kills leftover tasks, stops containerd and
//! its shims, unmounts whatever it mounted under its directory and removes it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How a test containerd is configured.
#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    /// The CRI pod sandbox ("pause") image.
    pub sandbox_image: String,
    /// How long to wait for the socket.
    pub start_timeout: Duration,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions { sandbox_image: "registry.k8s.io/pause:3.10".into(), start_timeout: Duration::from_secs(30) }
    }
}

/// A running containerd, stopped and cleaned up on drop.
pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    ctr: PathBuf,
}

impl Containerd {
    /// Starts containerd with default options; `None` (test skipped) when
    /// root, containerd, runc or ctr are missing outside CI.
    pub fn start() -> Option<Self> {
        Self::start_with(ContainerdOptions::default())
    }

    /// Starts containerd with `opts`; `None` when prerequisites are missing.
    pub fn start_with(opts: ContainerdOptions) -> Option<Self> {
        if !super::require_root() {
            return None;
        }
        let bin = super::require_tool("containerd")?;
        super::require_tool("runc")?;
        let ctr = super::require_tool("ctr")?;
        // Short path: the socket path must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new().prefix("ctrd-").tempdir_in("/tmp").unwrap();
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &socket, &opts)).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut c = Containerd { dir, socket, child: Some(child), ctr };
        c.wait_ready(opts.start_timeout);
        Some(c)
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited early ({status}); log:\n{}", self.log());
            }
            if self.socket.exists() {
                let out = self.ctr(&["version"]);
                if out.status.success() {
                    return;
                }
            }
            if start.elapsed() > timeout {
                panic!("containerd did not come up within {timeout:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's root directory (content store, snapshots, metadata).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The temp dir holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr --address <socket> ARGS…`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Runs ctr and returns its stdout; panics with stderr on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Stops containerd (SIGTERM, then SIGKILL) and waits for it, keeping its
    /// directory. Used to test a loader against a dead socket.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills and deletes every task and container, in every namespace.
    fn remove_tasks(&self) {
        let namespaces = String::from_utf8_lossy(&self.ctr(&["namespaces", "ls", "-q"]).stdout).into_owned();
        for ns in namespaces.lines().filter(|l| !l.is_empty()) {
            let tasks = String::from_utf8_lossy(&self.ctr(&["-n", ns, "tasks", "ls", "-q"]).stdout).into_owned();
            for task in tasks.lines().filter(|l| !l.is_empty()) {
                self.ctr(&["-n", ns, "tasks", "kill", "-a", "-s", "SIGKILL", task]);
                // delete fails until the task has stopped; retry briefly.
                for _ in 0..50 {
                    if self.ctr(&["-n", ns, "tasks", "delete", "-f", task]).status.success() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let containers =
                String::from_utf8_lossy(&self.ctr(&["-n", ns, "containers", "ls", "-q"]).stdout).into_owned();
            for c in containers.lines().filter(|l| !l.is_empty()) {
                self.ctr(&["-n", ns, "containers", "delete", c]);
            }
        }
    }

    /// Kills shims that still serve this containerd (their command line names
    /// our socket), by pid.
    fn kill_shims(&self) {
        let needle = self.socket.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else { return };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim") && cmdline.split('\0').any(|a| a == needle) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Unmounts everything mounted below our directory, deepest first.
    fn unmount_all(&self) {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let c = std::ffi::CString::new(p).unwrap();
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.remove_tasks();
        }
        self.stop();
        self.kill_shims();
        self.unmount_all();
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap());
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn config_toml(dir: &Path, socket: &Path, opts: &ContainerdOptions) -> String {
    let d = dir.display();
    let s = socket.display();
    let sandbox = &opts.sandbox_image;
    // Snapshotters that cannot work here are disabled to keep the log quiet;
    // CRI needs no CNI for host-network pods; restrict_oom_score_adj because
    // the sandbox lacks CAP_SYS_RESOURCE.
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{s}"
  tcp_address = ""

[ttrpc]
  address = "{s}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#
    )
}
