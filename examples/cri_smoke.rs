//! The VM test's stand-in for kubelet (`tests/vm.rs`): run inside the VM by a
//! unit ordered after `preseed-load.service`, it does through containerd's CRI
//! API what kubelet's first pod start does — list images, run a host-network
//! pod sandbox, create and start a container, wait for it to exit, read its
//! log — and prints what it saw as `PRESEED-VM: …` lines on stdout (the
//! serial console), for the test on the host to judge.
//!
//! Lines (one fact each):
//! * `PRESEED-VM: boot <boot_id>`
//! * `PRESEED-VM: as <unit>`  the unit it runs as (kubelet's stand-in, or the failure reporter)
//! * `PRESEED-VM: net <interface>`  every network interface (the VM has none but `lo`)
//! * `PRESEED-VM: load-at-start <SubState>`  preseed-load.service when kubelet's stand-in
//!   started: `running` while it still imports background images after READY
//!   (`Type=notify`), `exited` once done
//! * `PRESEED-VM: unit <name> <ActiveState> <Result>`
//! * `PRESEED-VM: load-log <line>`  every journal line of `preseed-load.service` this boot
//! * `PRESEED-VM: image <name> pinned=<true|false>`  every name CRI lists
//! * `PRESEED-VM: sandbox ready` / `PRESEED-VM: container exit=<code>` / `PRESEED-VM: container-log <line>`
//! * `PRESEED-VM: error <what>`
//! * `PRESEED-VM: journal <line>`  the preseed-load and containerd journal of this boot
//! * `PRESEED-VM: done`  last line
//!
//! Usage: `cri_smoke [--socket PATH] [--image REF] [--as UNIT]`.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;

const MARK: &str = "PRESEED-VM:";

/// One fact per line, flushed at once: the console is shared with the kernel
/// and systemd, so each line goes out in a single write.
fn say(what: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{MARK} {what}\n").as_bytes());
    let _ = out.flush();
}

fn output(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(could not run {cmd:?}: {e})"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut socket = "/run/containerd/containerd.sock".to_string();
    let mut image = "preseed.local/hello:0.1".to_string();
    let mut unit = String::from("?");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--socket", Some(v)) => socket = v,
            ("--image", Some(v)) => image = v,
            ("--as", Some(v)) => unit = v,
            _ => {
                eprintln!("usage: cri_smoke [--socket PATH] [--image REF] [--as UNIT]");
                std::process::exit(2);
            }
        }
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim().to_string();
    say(format!("boot {boot_id}"));
    say(format!("as {unit}"));
    let mut interfaces: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    interfaces.sort();
    for i in interfaces {
        say(format!("net {i}"));
    }
    let load_state = || {
        let props = output(Command::new("systemctl").args(["show", "-p", "SubState", "preseed-load.service"]));
        props.trim().strip_prefix("SubState=").unwrap_or("?").to_string()
    };
    say(format!("load-at-start {}", load_state()));
    // What kubelet does first: the pod, while the loader may still import
    // background images.
    if let Err(e) = pod(&socket, &image, &boot_id).await {
        say(format!("error {e:#}"));
    }
    // Then wait for the whole load, to report it.
    let deadline = Instant::now() + Duration::from_secs(600);
    while load_state() == "running" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for unit in ["containerd.service", "preseed-load.service"] {
        let props = output(Command::new("systemctl").args(["show", "-p", "ActiveState", "-p", "Result", unit]));
        let get = |k: &str| {
            props.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('='))).unwrap_or("?").to_string()
        };
        say(format!("unit {unit} {} {}", get("ActiveState"), get("Result")));
    }
    for line in
        output(Command::new("journalctl").args(["-b", "-u", "preseed-load.service", "-o", "cat", "--no-pager"])).lines()
    {
        say(format!("load-log {line}"));
    }
    if let Err(e) = list_images(&socket).await {
        say(format!("error listing images: {e:#}"));
    }
    let journal = output(Command::new("journalctl").args([
        "-b",
        "-u",
        "preseed-load.service",
        "-u",
        "containerd.service",
        "-o",
        "short-monotonic",
        "--no-pager",
    ]));
    for line in journal.lines() {
        say(format!("journal {line}"));
    }
    say("done");
}

async fn channel(socket: &str) -> Result<tonic::transport::Channel> {
    containerd_client::connect(socket).await.with_context(|| format!("connecting to {socket}"))
}

async fn list_images(socket: &str) -> Result<()> {
    let mut is = cri::image_service_client::ImageServiceClient::new(channel(socket).await?);
    let images = is.list_images(cri::ListImagesRequest { filter: None }).await.context("ListImages")?.into_inner();
    for i in images.images {
        for tag in &i.repo_tags {
            say(format!("image {tag} pinned={}", i.pinned));
        }
    }
    Ok(())
}

/// Kubelet's first pod, offline: sandbox, then the container, then cleanup
/// (so the next boot can reuse the names).
async fn pod(socket: &str, image: &str, boot_id: &str) -> Result<()> {
    let mut rs = cri::runtime_service_client::RuntimeServiceClient::new(channel(socket).await?);
    let uid = format!("preseed-vm-{boot_id}");
    let log_directory = format!("/var/log/pods/default_preseed-vm_{uid}");
    let namespaces = cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    };
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "preseed-vm".into(),
            uid: uid.clone(),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_directory.clone(),
        // Host network: no CNI needed, and no hostname may be set.
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
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
    say(format!("sandbox ready ({:.2}s)", started.elapsed().as_secs_f64()));

    let container = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "hello".into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        log_path: "hello/0.log".into(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = rs
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(container),
            sandbox_config: Some(config),
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id;
    rs.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.context("StartContainer")?;
    let deadline = Instant::now() + Duration::from_secs(60);
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
            bail!("container {id} still in state {} after 60s", status.state);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    say(format!("container exit={exit} ({:.2}s)", started.elapsed().as_secs_f64()));
    // CRI log format: `<time> <stream> <F|P> <text>`.
    let log = std::fs::read_to_string(format!("{log_directory}/hello/0.log")).context("reading the container log")?;
    for line in log.lines() {
        say(format!("container-log {}", line.splitn(4, ' ').nth(3).unwrap_or(line)));
    }
    rs.remove_container(cri::RemoveContainerRequest { container_id: id }).await.context("RemoveContainer")?;
    rs.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() })
        .await
        .context("StopPodSandbox")?;
    rs.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: sandbox })
        .await
        .context("RemovePodSandbox")?;
    Ok(())
}
