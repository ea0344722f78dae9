//! A CRI v1 client call the way kubelet makes it: start a host-network pod
//! sandbox, check it is ready, stop and remove it.

use std::path::Path;

use k8s_cri::v1 as cri;

/// Runs a host-network pod sandbox on containerd's CRI at `socket` and
/// tears it down. Panics with containerd's log on failure.
pub fn run_host_network_pod_sandbox(socket: &Path, log: impl Fn() -> String) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let channel = containerd_client::connect(socket).await.unwrap();
        let mut rs = cri::runtime_service_client::RuntimeServiceClient::new(channel);
        let host = cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            pid: cri::NamespaceMode::Pod as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "preseed-test".into(),
                uid: "preseed-test-uid".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            // Host network: no CNI needed, and no hostname may be set.
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(host),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
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
