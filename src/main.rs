//! The `preseed` command: parses arguments and calls the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;

use preseed::build::bundle::{self, BundleOptions, Progress};
use preseed::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.is_node_side() {
        one_malloc_arena();
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("preseed: error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// glibc gives threads their own malloc arenas (up to 8 per core), and an
/// arena keeps what was freed in it for its own thread. `load` streams 1 MiB
/// read and gRPC buffers from whichever tokio or blocking thread runs, so
/// peak RSS grew with how the threads happened to be scheduled (50-58 MiB
/// for 1.1 GB on containerd 1.7). One arena reuses every freed buffer:
/// 39-40 MiB, at the same speed (the threads mostly wait on containerd).
/// Node-side commands only: they run on every node, beside the workloads.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The error and its causes, each said once: many errors already include
/// their cause in their own message.
fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}

/// A node-side command's report on stdout, as JSON or for people; exit
/// status 1 when it lists a failure.
fn print_report(
    json: bool,
    to_json: impl FnOnce() -> String,
    print_human: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    failed: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", to_json());
    } else {
        print_human(&mut std::io::stdout())?;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `--policy FILE`, read with its keys (a node told to check signatures
/// stops if it cannot).
fn read_policy(
    path: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<std::sync::Arc<preseed::node::policy::Policy>>> {
    Ok(path.map(|p| preseed::node::policy::Policy::load(&p)).transpose()?.map(std::sync::Arc::new))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Bundle {
            manifest,
            out,
            format,
            verity,
            cache,
            offline,
            allow_unpinned,
            jobs,
            no_progress,
            workspace,
        } => {
            let cache = cache.unwrap_or_else(|| out.parent().unwrap_or(&out).join("preseed-cache"));
            let opts = BundleOptions {
                manifest,
                out,
                format,
                verity,
                cache,
                offline,
                allow_unpinned,
                jobs,
                workspace,
                progress: if no_progress { Progress::Lines } else { Progress::Auto },
            };
            let summary = bundle::bundle(&opts).await?;
            println!("{summary}");
        }
        Command::Push { out, reference, insecure, json } => {
            let opts = preseed::build::push::PushOptions { out, reference, insecure };
            let report = preseed::build::push::push(&opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pushed {}@{}: {} blob(s) uploaded ({}), {} already there ({}), {} mounted ({})",
                    report.reference.split_once('@').map_or(report.reference.as_str(), |(r, _)| r),
                    report.digest,
                    report.blobs.uploaded,
                    preseed::human::human_bytes(report.bytes.uploaded),
                    report.blobs.present,
                    preseed::human::human_bytes(report.bytes.present),
                    report.blobs.mounted,
                    preseed::human::human_bytes(report.bytes.mounted),
                );
            }
        }
        Command::Pull { reference, to, from, work, insecure, json } => {
            use std::io::IsTerminal;
            let opts = preseed::node::pull::PullOptions {
                reference,
                target: to,
                from,
                work,
                insecure,
                progress: !json && std::io::stderr().is_terminal(),
            };
            let report = preseed::node::pull::pull(&opts, std::sync::Arc::new(preseed::node::sys::Linux)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let b = &report.bytes;
                println!(
                    "pulled {} into {}: {} reused, {} fetched, {} already fetched, {} of plan; sha256 {}{}",
                    report.digest,
                    report.target.display(),
                    preseed::human::human_bytes(b.reused),
                    preseed::human::human_bytes(b.fetched),
                    preseed::human::human_bytes(b.skipped),
                    preseed::human::human_bytes(b.plan),
                    report.proof.sha256,
                    report.proof.root_hash.as_ref().map(|h| format!(", verity root hash {h}")).unwrap_or_default(),
                );
            }
        }
        Command::Pin { manifest, update } => {
            let changes = preseed::build::pin::pin(&manifest, update).await?;
            for c in &changes {
                println!("{}:{}: {} -> {}", manifest.display(), c.line, c.before, c.after);
            }
            println!("{} reference(s) pinned", changes.len());
        }
        #[cfg(not(feature = "containerd"))]
        Command::Load { .. } => anyhow::bail!("{}", preseed::cli::NO_LOADER),
        #[cfg(feature = "containerd")]
        Command::Load { from, address, timeout, jobs, unpack, snapshotter, json, verity, policy } => {
            let mut opts = preseed::node::load::LoadOptions::new(from.source());
            opts.address = address;
            opts.timeout = std::time::Duration::from_secs(timeout);
            opts.jobs = jobs;
            opts.unpack = unpack == Some(preseed::cli::Unpack::All);
            opts.unpack_boot = unpack == Some(preseed::cli::Unpack::Boot);
            opts.snapshotter = snapshotter;
            opts.notify = preseed::node::notify::Notifier::from_env()
                .context("$NOTIFY_SOCKET is set but unusable")?
                .map(std::sync::Arc::new);
            opts.verity_root_hash = verity.root_hash()?;
            opts.policy = read_policy(policy)?;
            let report = preseed::node::load::load(&opts).await?;
            return print_report(json, || report.to_json(), |out| report.print_human(out), report.failed());
        }
        Command::Place { from, root, config, overlay, previous, json, verity, policy } => {
            let mut opts = preseed::node::place::PlaceOptions::new(from.source());
            opts.root = root;
            opts.config = config;
            opts.verity_root_hash = verity.root_hash()?;
            opts.policy = read_policy(policy)?;
            let previous = previous.as_deref().map(preseed::node::read::open::Source::detect);
            let report = tokio::task::spawn_blocking(move || match overlay {
                true => preseed::node::place::overlay::overlay(&opts, previous.as_ref()),
                false => preseed::node::place::place(&opts),
            })
            .await??;
            return print_report(json, || report.to_json(), |out| report.print_human(out), report.failed());
        }
        Command::Settle { root, config, next, json } => {
            let next = next.as_deref().map(preseed::node::read::open::Source::detect);
            let opts = preseed::node::place::settle::SettleOptions { root, config, next };
            let report = tokio::task::spawn_blocking(move || preseed::node::place::settle::settle(&opts)).await??;
            return print_report(json, || report.to_json(), |out| report.print_human(out), report.failed());
        }
        Command::Serve { from, listen, policy } => {
            let server = preseed::node::serve::Server::bind(&from.source(), listen, read_policy(policy)?).await?;
            // Before "serving" is printed, so a stop sent as soon as it is read is a clean one.
            let shutdown = preseed::node::serve::shutdown_signal();
            for w in &server.catalog().warnings {
                eprintln!("preseed: warning: {w}");
            }
            println!(
                "preseed: serving {} image(s) in {} repositories from {} on http://{}",
                server.catalog().images,
                server.catalog().repository_count(),
                server.source_id(),
                server.local_addr()
            );
            server.run(shutdown).await;
        }
        Command::Diff { old, new, json } => {
            let diff = preseed::node::diff::diff_paths(&old, &new)?;
            if json {
                print!("{}", diff.to_json());
            } else {
                print!("{}", diff.render());
            }
        }
        Command::Inspect { partition, json, verity } => {
            let inspected = match verity.root_hash()? {
                Some(root) => preseed::node::inspect::read_index_verified(&partition, &root),
                None => preseed::node::inspect::read_index(&partition),
            }
            .with_context(|| format!("inspecting {}", partition.display()))?;
            if json {
                println!("{}", String::from_utf8_lossy(&inspected.index.to_json()).trim_end());
            } else {
                print!("{}", preseed::node::inspect::render(&inspected.index));
            }
            // What load would refuse: said the same way, and the exit status says so.
            for r in &inspected.refused {
                eprintln!("preseed: error: {r}; load, place and serve skip this image");
            }
            if !inspected.refused.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
