//! CRI v1 calls the way kubelet makes them: list images (with the pinned
//! flag CRI reports), start a host-network pod sandbox and a container in it,
//! read the container's log, stop and remove everything.

use std::path::Path;
use std::time::{Duration, Instant};

use containerd_client::tonic::transport::Channel;
use k8s_cri::v1 as cri;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

async fn channel(socket: &Path) -> Channel {
    containerd_client::connect(socket).await.unwrap()
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
pub fn list_images(socket: &Path) -> Vec<CriImage> {
    runtime().block_on(async {
        let mut is = cri::image_service_client::ImageServiceClient::new(channel(socket).await);
        let images = is.list_images(cri::ListImagesRequest { filter: None }).await.unwrap().into_inner().images;
        images.into_iter().map(|i| CriImage { repo_tags: i.repo_tags, pinned: i.pinned }).collect()
    })
}

/// The CRI image with `tag`, waiting up to 10 s for CRI to learn of it (it
/// follows containerd's image events).
pub fn wait_for_image(socket: &Path, tag: &str, pinned: bool) -> CriImage {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let images = list_images(socket);
        if let Some(i) = images.iter().find(|i| i.repo_tags.iter().any(|t| t == tag)) {
            if i.pinned == pinned {
                return i.clone();
            }
        }
        assert!(Instant::now() < deadline, "CRI does not list {tag} with pinned={pinned}: {images:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sandbox_config(log_dir: Option<&Path>) -> cri::PodSandboxConfig {
    let host = cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    };
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "preseed-test".into(),
            uid: "preseed-test-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_dir.map(|d| d.display().to_string()).unwrap_or_default(),
        // Host network: no CNI needed, and no hostname may be set.
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a host-network pod sandbox on containerd's CRI at `socket` and
/// tears it down. Panics with containerd's log on failure.
pub fn run_host_network_pod_sandbox(socket: &Path, log: impl Fn() -> String) {
    runtime().block_on(async {
        let mut rs = cri::runtime_service_client::RuntimeServiceClient::new(channel(socket).await);
        let config = sandbox_config(None);
        let id = rs
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() })
            .await
            .unwrap_or_else(|s| panic!("RunPodSandbox: {s:?}\ncontainerd log:\n{}", log()))
            .into_inner()
            .pod_sandbox_id;
        let status = rs
            .pod_sandbox_status(cri::PodSandboxStatusRequest { pod_sandbox_id: id.clone(), verbose: false })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
        rs.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await.unwrap();
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }).await.unwrap();
    });
}

/// Starts a host-network pod and, in it, a container of `image` running
/// `command`; waits for it to exit and returns its exit code and log (CRI's
/// log format: `<time> <stream> <tag> <line>`). Removes both after.
pub fn run_pod_with_container(socket: &Path, image: &str, command: &[&str], log: impl Fn() -> String) -> (i32, String) {
    let logs = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut rs = cri::runtime_service_client::RuntimeServiceClient::new(channel(socket).await);
        let config = sandbox_config(Some(logs.path()));
        let pod = rs
            .run_pod_sandbox(cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() })
            .await
            .unwrap_or_else(|s| panic!("RunPodSandbox: {s:?}\ncontainerd log:\n{}", log()))
            .into_inner()
            .pod_sandbox_id;
        let container = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "app".into(), attempt: 0 }),
            image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: "app.log".into(),
            ..Default::default()
        };
        let id = rs
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container),
                sandbox_config: Some(config),
            })
            .await
            .unwrap_or_else(|s| panic!("CreateContainer {image}: {s:?}\ncontainerd log:\n{}", log()))
            .into_inner()
            .container_id;
        rs.start_container(cri::StartContainerRequest { container_id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("StartContainer {image}: {s:?}\ncontainerd log:\n{}", log()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let exit_code = loop {
            let status = rs
                .container_status(cri::ContainerStatusRequest { container_id: id.clone(), verbose: false })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == cri::ContainerState::ContainerExited as i32 {
                break status.exit_code;
            }
            assert!(Instant::now() < deadline, "container of {image} did not exit: {status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        rs.remove_container(cri::RemoveContainerRequest { container_id: id }).await.unwrap();
        rs.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: pod.clone() }).await.unwrap();
        rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: pod }).await.unwrap();
        (exit_code, std::fs::read_to_string(logs.path().join("app.log")).unwrap_or_default())
    })
}
