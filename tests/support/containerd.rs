//! A real containerd (with runc) started by a test in a temp dir.
//!
//! Each [`Containerd`] has its own root, state, gRPC socket (no TCP) and CRI
//! plugin configuration, so tests run side by side and never touch the
//! machine's containerd. Dropping it kills leftover tasks, stops containerd and
//! its shims, unmounts whatever it mounted under its directory and removes it.
//!
//! Which containerd: the binaries in `$PRESEED_CONTAINERD_BIN` (a directory
//! with `containerd`, `ctr` and `containerd-shim-runc-v2`; `cargo xtask test`
//! sets it for 1.6, 1.7 and 2.x in turn), else the ones on PATH. 1.x gets a
//! version 2 config, 2.x its native version 3. A `panic:` in containerd's log
//! fails the test that started it.

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
    /// The directory of binaries to run, instead of [`bin_dir`]'s choice.
    pub bin: Option<PathBuf>,
    /// CRI's registry `config_path`: a directory of `<host>/hosts.toml`.
    pub registry_config_path: Option<PathBuf>,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        ContainerdOptions {
            sandbox_image: "registry.k8s.io/pause:3.10".into(),
            start_timeout: Duration::from_secs(30),
            bin: None,
            registry_config_path: None,
        }
    }
}

/// A running containerd, stopped and cleaned up on drop.
pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
    bin: PathBuf,
    ctr: PathBuf,
    version: Version,
    opts: ContainerdOptions,
}

/// A containerd version, from `containerd --version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// e.g. `2.1.9+unknown`, `1.6.20~ds1`.
    pub text: String,
    /// 1 or 2.
    pub major: u32,
    /// e.g. 7 for 1.7.
    pub minor: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The directory holding the containerd binaries to test, or `None` (skipped
/// outside CI) when there are none.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PRESEED_CONTAINERD_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        for b in ["containerd", "ctr", "containerd-shim-runc-v2"] {
            assert!(dir.join(b).is_file(), "PRESEED_CONTAINERD_BIN={}: no {b} there", dir.display());
        }
        return Some(dir);
    }
    let bin = super::require_tool("containerd")?;
    super::require_tool("ctr")?;
    Some(bin.parent().unwrap().to_path_buf())
}

/// The version of the containerd in `bin`.
pub fn version_of(bin: &Path) -> Version {
    let out = Command::new(bin.join("containerd")).arg("--version").output().expect("run containerd --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "containerd github.com/containerd/containerd/v2 2.1.9+unknown" (and a
    // build id on 1.x): the third word is the version.
    let v = text.split_whitespace().nth(2).unwrap_or_else(|| panic!("containerd --version printed {text:?}"));
    let mut nums = v.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    Version { text: v.to_string(), major, minor }
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
        let bin = match &opts.bin {
            Some(b) => b.clone(),
            None => bin_dir()?,
        };
        super::require_tool("runc")?;
        let version = version_of(&bin);
        eprintln!("containerd {version} from {}", bin.display());
        // Short path: the socket path must fit in sun_path (108 bytes).
        let dir = tempfile::Builder::new().prefix("ctrd-").tempdir_in("/tmp").unwrap();
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        let text = if version.major >= 2 {
            config_v3(dir.path(), &socket, &opts)
        } else {
            config_v2(dir.path(), &socket, &opts)
        };
        std::fs::write(&config, text).unwrap();
        let ctr = bin.join("ctr");
        let mut c = Containerd { dir, socket, child: None, bin, ctr, version, opts };
        c.spawn();
        Some(c)
    }

    /// Starts the containerd process on our config (first start or restart).
    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("containerd.log")).unwrap();
        // containerd finds its shim on PATH: ours first.
        let path = format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap_or_default());
        let child = Command::new(self.bin.join("containerd"))
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        self.child = Some(child);
        self.wait_ready(self.opts.start_timeout);
    }

    /// Starts containerd again on the same root after [`Containerd::stop`] or
    /// [`Containerd::kill`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "containerd is still running");
        self.spawn();
    }

    /// Kills containerd with SIGKILL (a crash, as far as clients can tell)
    /// and waits for it, keeping its directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The `ctr` of this containerd's version.
    pub fn ctr_path(&self) -> &Path {
        &self.ctr
    }

    /// The version under test.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// containerd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Panics unless containerd (the process this handle started) still runs.
    pub fn assert_running(&mut self) {
        let status = self.child.as_mut().expect("containerd was stopped").try_wait().unwrap();
        assert!(status.is_none(), "containerd {} exited ({status:?}); log:\n{}", self.version, self.log());
    }

    /// Panics if containerd's log holds a Go panic (containerd crashed or a
    /// request handler panicked).
    pub fn assert_no_panic(&self) {
        let log = self.log();
        if let Some(at) = log.find("panic:") {
            let from = log[..at].rfind('\n').map_or(0, |n| n + 1);
            let excerpt: String = log[from..].lines().take(30).collect::<Vec<_>>().join("\n");
            panic!("containerd {} panicked:\n{excerpt}", self.version);
        }
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd {} exited early ({status}); log:\n{}", self.version, self.log());
            }
            if self.socket.exists() {
                let out = self.ctr(&["version"]);
                if out.status.success() {
                    return;
                }
            }
            if start.elapsed() > timeout {
                panic!("containerd {} did not come up within {timeout:?}; log:\n{}", self.version, self.log());
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
        // SAFETY: a signal to a process this test started; no memory is passed.
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
                // SAFETY: a signal to a process this test started; no memory is passed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Unmounts everything mounted under this containerd's directory.
    pub fn unmount_all(&self) {
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
            // SAFETY: a NUL-terminated path that outlives the call.
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
        if !std::thread::panicking() {
            self.assert_no_panic();
        }
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

/// containerd 1.6/1.7: config version 2, CRI under `io.containerd.grpc.v1.cri`.
fn config_v2(dir: &Path, socket: &Path, opts: &ContainerdOptions) -> String {
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
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry}"
"#,
        registry = opts.registry_config_path.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
    )
}

/// containerd 2.x: its native config version 3, where CRI is split into
/// `io.containerd.cri.v1.images` (sandbox image under `pinned_images`) and
/// `io.containerd.cri.v1.runtime`.
fn config_v3(dir: &Path, socket: &Path, opts: &ContainerdOptions) -> String {
    let d = dir.display();
    let s = socket.display();
    let sandbox = &opts.sandbox_image;
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = "{s}"
  tcp_address = ""

[ttrpc]
  address = "{s}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{registry}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        registry = opts.registry_config_path.as_deref().map(|p| p.display().to_string()).unwrap_or_default()
    )
}
