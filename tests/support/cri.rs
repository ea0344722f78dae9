//! CRI v1 calls the way kubelet makes them, on containerd's socket: list
//! images (with the pinned flag CRI reports), start a host-network pod
//! sandbox and a container in it, wait for it to exit, read its log, stop
//! and remove everything.
//!
//! One client for the tests (`support::cri`) and for the VM test's stand-in
//! kubelet (`examples/cri_smoke.rs` includes this file with `#[path]`), so it
//! names nothing outside itself. [`list_images`] and [`run_pod`] return
//! errors (the stand-in reports them and goes on); the helpers after them
//! are the tests' and panic, with containerd's log.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use containerd_client::tonic::transport::Channel;
use k8s_cri::v1 as cri;

/// How long a container may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

async fn channel(socket: &Path) -> Result<Channel> {
    containerd_client::connect(socket).await.with_context(|| format!("connecting to {}", socket.display()))
}

/// One image as CRI's ImageService lists it.
#[derive(Clone, Debug)]
pub struct CriImage {
    /// Its tags (names).
    pub repo_tags: Vec<String>,
    /// Whether CRI treats it as pinned (never garbage collected by kubelet).
    pub pinned: bool,
}

/// CRI `ListImages`.
pub fn list_images(socket: &Path) -> Result<Vec<CriImage>> {
    runtime().block_on(async {
        let mut is = cri::image_service_client::ImageServiceClient::new(channel(socket).await?);
        let images = is.list_images(cri::ListImagesRequest { filter: None }).await.context("ListImages")?;
        Ok(images
            .into_inner()
            .images
            .into_iter()
            .map(|i| CriImage { repo_tags: i.repo_tags, pinned: i.pinned })
            .collect())
    })
}

/// CRI `PullImage`, as kubelet pulls an image it lacks: through whatever
/// registry configuration containerd has (`config_path` and its
/// `hosts.toml` files). Returns the image reference CRI answers.
pub fn pull_image(socket: &Path, image: &str) -> Result<String> {
    runtime().block_on(async {
        let mut is = cri::image_service_client::ImageServiceClient::new(channel(socket).await?);
        let req = cri::PullImageRequest {
            image: Some(cri::ImageSpec { image: image.to_string(), ..Default::default() }),
            auth: None,
            sandbox_config: None,
        };
        let resp = is.pull_image(req).await.with_context(|| format!("PullImage {image}"))?;
        Ok(resp.into_inner().image_ref)
    })
}

/// A host-network pod in namespace `default`, as kubelet would start it.
pub struct Pod<'a> {
    /// The sandbox's name.
    pub name: &'a str,
    /// The sandbox's uid.
    pub uid: &'a str,
    /// Where CRI writes the container's log, `<dir>/<container>/0.log`
    /// (kubelet's layout); a pod with a container needs one.
    pub log_directory: Option<&'a Path>,
    /// The container to run in the sandbox, if any.
    pub container: Option<Container<'a>>,
}

/// A container of a [`Pod`].
pub struct Container<'a> {
    /// Its name in the pod.
    pub name: &'a str,
    /// The image reference it runs.
    pub image: &'a str,
    /// Its command; empty: the image's entrypoint.
    pub command: &'a [&'a str],
}

/// What [`run_pod`] saw, as it saw it (a failure later loses none of it).
pub enum Seen<'a> {
    /// The sandbox is ready, so long after the start.
    SandboxReady(Duration),
    /// The container exited with this code, so long after the start.
    Exited(i32, Duration),
    /// A line the container wrote (CRI's `<time> <stream> <tag>` cut off).
    Log(&'a str),
}

/// Host network: no CNI needed, and no hostname may be set. The container
/// gets the same options as its sandbox, as kubelet gives them.
fn host_network() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn sandbox_config(pod: &Pod) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: pod.name.into(),
            uid: pod.uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: pod.log_directory.map(|d| d.display().to_string()).unwrap_or_default(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(c: &Container) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: c.name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: c.image.into(), ..Default::default() }),
        command: c.command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{}/0.log", c.name),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(host_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Starts `pod`'s sandbox and, if it has one, its container; waits for the
/// container to exit and reads its log; then removes both (so the next run
/// can reuse the names). Tells `seen` each step as it happens.
pub fn run_pod(socket: &Path, pod: &Pod, mut seen: impl FnMut(Seen)) -> Result<()> {
    runtime().block_on(async {
        let mut rs = cri::runtime_service_client::RuntimeServiceClient::new(channel(socket).await?);
        let config = sandbox_config(pod);
        let started = Instant::now();
        let sandbox = rs
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() })
            .await
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        let status = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: sandbox.clone(), verbose: false })
            .await
            .context("PodSandboxStatus")?
            .into_inner()
            .status
            .context("PodSandboxStatus without a status")?;
        if status.state != cri::PodSandboxState::SandboxReady as i32 {
            bail!("sandbox {sandbox} is in state {}", status.state);
        }
        seen(Seen::SandboxReady(started.elapsed()));

        if let Some(c) = &pod.container {
            let dir = pod.log_directory.context("a pod with a container needs a log directory")?;
            // kubelet makes the container's log directory; CRI only opens the file.
            std::fs::create_dir_all(dir.join(c.name)).context("creating the container's log directory")?;
            let id = rs
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox.clone(),
                    config: Some(container_config(c)),
                    sandbox_config: Some(config),
                })
                .await
                .with_context(|| format!("CreateContainer {}", c.image))?
                .into_inner()
                .container_id;
            rs.start_container(cri::StartContainerRequest { container_id: id.clone() })
                .await
                .with_context(|| format!("StartContainer {}", c.image))?;
            let deadline = Instant::now() + EXIT_TIMEOUT;
            let exit = loop {
                let status = rs
                    .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false })
                    .await
                    .context("ContainerStatus")?
                    .into_inner()
                    .status
                    .context("ContainerStatus without a status")?;
                if status.state == cri::ContainerState::ContainerExited as i32 {
                    break status.exit_code;
                }
                if Instant::now() > deadline {
                    bail!("container {id} of {} still in state {} after {EXIT_TIMEOUT:?}", c.image, status.state);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            seen(Seen::Exited(exit, started.elapsed()));
            let log = std::fs::read_to_string(dir.join(c.name).join("0.log")).context("reading the container log")?;
            for line in log.lines() {
                seen(Seen::Log(line.splitn(4, ' ').nth(3).unwrap_or(line)));
            }
            rs.remove_container(cri::RemoveContainerRequest { container_id: id }).await.context("RemoveContainer")?;
        }
        rs.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() })
            .await
            .context("StopPodSandbox")?;
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sandbox })
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    })
}

/// The CRI image with `tag`, waiting up to 10 s for CRI to learn of it (it
/// follows containerd's image events).
pub fn wait_for_image(socket: &Path, tag: &str, pinned: bool) -> CriImage {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let images = list_images(socket).unwrap();
        if let Some(i) = images.iter().find(|i| i.repo_tags.iter().any(|t| t == tag)) {
            if i.pinned == pinned {
                return i.clone();
            }
        }
        assert!(Instant::now() < deadline, "CRI does not list {tag} with pinned={pinned}: {images:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a host-network pod sandbox on containerd's CRI at `socket` and
/// tears it down. Panics with containerd's log on failure.
pub fn run_host_network_pod_sandbox(socket: &Path, log: impl Fn() -> String) {
    let pod = Pod { name: "preseed-test", uid: "preseed-test-uid", log_directory: None, container: None };
    run_pod(socket, &pod, |_| {}).unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", log()));
}

/// Starts a host-network pod and, in it, a container of `image` running
/// `command`; waits for it to exit and returns its exit code and output
/// (the lines of its CRI log). Removes both after. Panics with containerd's
/// log on failure.
pub fn run_pod_with_container(socket: &Path, image: &str, command: &[&str], log: impl Fn() -> String) -> (i32, String) {
    let logs = tempfile::tempdir().unwrap();
    let pod = Pod {
        name: "preseed-test",
        uid: "preseed-test-uid",
        log_directory: Some(logs.path()),
        container: Some(Container { name: "app", image, command }),
    };
    let (mut exit, mut output) = (None, String::new());
    run_pod(socket, &pod, |seen| match seen {
        Seen::SandboxReady(_) => {}
        Seen::Exited(code, _) => exit = Some(code),
        Seen::Log(line) => output += &format!("{line}\n"),
    })
    .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", log()));
    (exit.expect("run_pod returned without the container's exit"), output)
}
