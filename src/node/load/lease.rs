//! Import leases: each says which loader process took it, so a later load can
//! remove the ones an interrupted load left behind instead of letting them
//! hold content for their hour.
//!
//! A lease is stale when its owner process is gone: the label records the
//! boot id, pid and process start time (so a reused pid, or a reboot, is not
//! mistaken for the owner still running).

use std::collections::BTreeMap;

use super::containerd::Client;
use super::report::StaleLease;

/// The lease label naming the loader process that holds the lease.
pub const LABEL_OWNER: &str = "dev.preseed.load.owner";

/// This process, as `<boot id>/<pid>/<start time in clock ticks>`.
pub fn owner() -> String {
    let pid = std::process::id();
    format!("{}/{pid}/{}", boot_id(), start_time(pid).unwrap_or_default())
}

/// The labels every import lease of this process carries.
pub fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_OWNER.to_string(), owner())])
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Field 22 of `/proc/<pid>/stat`, after the parenthesized command name
/// (which may itself contain spaces and parentheses).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_string)
}

/// Whether the process named by an owner label still runs.
fn alive(owner: &str) -> bool {
    let mut parts = owner.split('/');
    let (Some(boot), Some(pid), Some(start)) = (parts.next(), parts.next(), parts.next()) else {
        // Not a label this loader wrote: leave the lease alone.
        return true;
    };
    if boot != boot_id() {
        return false;
    }
    match pid.parse::<u32>() {
        Ok(pid) => start_time(pid).as_deref() == Some(start),
        Err(_) => true,
    }
}

/// Deletes, in every namespace, the leases of loader processes that are no
/// longer running, and the half-done content writes they left (containerd
/// keeps those for a resume that will never come: their refs start with the
/// lease id). Waits for the garbage collection that follows; run it once
/// the images are in, so that collection takes only what nothing needs.
pub async fn remove_stale(client: &Client) -> Result<Vec<StaleLease>, tonic::Status> {
    let mut removed = Vec::new();
    for ns in client.namespaces().await? {
        let mut ingests = None;
        for (id, labels) in client.leases_list(&ns).await? {
            let Some(owner) = labels.get(LABEL_OWNER) else { continue };
            if alive(owner) {
                continue;
            }
            if ingests.is_none() {
                ingests = Some(client.ingests(&ns).await?);
            }
            let prefix = format!("{id}-");
            for r in ingests.iter().flatten().filter(|r| r.starts_with(&prefix)) {
                client.ingest_abort(&ns, r).await?;
            }
            client.lease_delete(&ns, &id, true).await?;
            removed.push(StaleLease { namespace: ns.clone(), id });
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_others_are_not() {
        assert!(alive(&owner()));
        let me = owner();
        let mut parts: Vec<&str> = me.split('/').collect();
        parts[2] = "1";
        assert!(!alive(&parts.join("/")), "same pid, other start time: pid reused");
        assert!(!alive(&format!("00000000-0000-0000-0000-000000000000/{}/{}", parts[1], "1")), "other boot");
        assert!(alive("something else"), "foreign label values are not ours to judge");
    }
}
