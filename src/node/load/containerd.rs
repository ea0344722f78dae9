//! containerd's gRPC API over its unix socket, reduced to what the loader
//! uses: content (info, write, label updates), leases, images, namespaces,
//! and the snapshot and diff services for unpacking. Every call names its
//! namespace (`containerd-namespace` metadata) and, where it creates
//! resources, the lease that holds them (`containerd-lease`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::{self, Code, Request, Status};
use containerd_client::types as ctypes;
use tonic::transport::Channel;

use crate::digest::Digest;
use crate::oci::Descriptor;

/// gRPC metadata key naming the namespace of a call.
pub const NAMESPACE_HEADER: &str = "containerd-namespace";
/// gRPC metadata key naming the lease that holds what a call creates.
pub const LEASE_HEADER: &str = "containerd-lease";
/// Bytes per content write message (containerd accepts up to 16 MiB).
const CHUNK: usize = 1 << 20;

/// What a failed call says, in words a node operator can act on: a dropped
/// connection means containerd stopped or crashed during the load. A call
/// in flight when the connection drops ends as `Cancelled` ("operation was
/// canceled"): the loader cancels none of its own calls.
pub fn describe(status: &Status) -> String {
    let msg = status.message();
    let lost = matches!(status.code(), Code::Unavailable | Code::Cancelled)
        || (status.code() == Code::Unknown
            && ["transport error", "connection", "broken pipe", "h2 protocol error"].iter().any(|m| msg.contains(m)));
    if lost {
        format!(
            "lost the connection to containerd ({msg}): it stopped or crashed during the load \
             (see its log, e.g. journalctl -u containerd); run preseed load again once it is back"
        )
    } else {
        msg.to_string()
    }
}

/// containerd could not be reached.
#[derive(Debug, thiserror::Error)]
#[error(
    "containerd is not answering on {socket} (waited {waited:.0?}): {last_error}; \
     is containerd running, and is this its socket (--address)?"
)]
pub struct Unreachable {
    /// The socket.
    pub socket: PathBuf,
    /// How long we waited.
    pub waited: Duration,
    /// The last connection error.
    pub last_error: String,
}

/// Where a blob's bytes come from when writing it.
#[derive(Clone)]
pub enum BlobBytes {
    /// A byte range of a file.
    File {
        /// The file.
        file: Arc<File>,
        /// Offset of the first byte.
        offset: u64,
    },
    /// In memory.
    Memory(Arc<[u8]>),
}

/// A connection to containerd.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

fn metadata<T>(msg: T, namespace: &str, lease: Option<&str>) -> Result<Request<T>, Status> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    let ns = namespace.parse().map_err(|_| Status::invalid_argument(format!("bad namespace {namespace:?}")))?;
    md.insert(NAMESPACE_HEADER, ns);
    if let Some(lease) = lease {
        let l = lease.parse().map_err(|_| Status::invalid_argument(format!("bad lease id {lease:?}")))?;
        md.insert(LEASE_HEADER, l);
    }
    Ok(req)
}

fn not_found<T>(r: Result<T, Status>) -> Result<Option<T>, Status> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

/// A descriptor in containerd's wire form.
pub fn to_wire(d: &Descriptor) -> ctypes::Descriptor {
    ctypes::Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        annotations: HashMap::new(),
    }
}

impl Client {
    /// Connects to `socket`, retrying until containerd answers a version
    /// request or `timeout` has passed.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Client, Unreachable> {
        let start = Instant::now();
        let mut last_error;
        loop {
            last_error = match containerd_client::connect(socket).await {
                Ok(channel) => {
                    let mut v = api::version_client::VersionClient::new(channel.clone());
                    match v.version(()).await {
                        Ok(_) => return Ok(Client { channel }),
                        Err(s) => format!("version request failed: {}", s.message()),
                    }
                }
                Err(e) => {
                    // Each cause once: tonic repeats the OS error at two levels.
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        let cause = s.to_string();
                        if !msg.contains(&cause) {
                            msg = format!("{msg}: {cause}");
                        }
                        src = s.source();
                    }
                    msg
                }
            };
            if start.elapsed() >= timeout {
                return Err(Unreachable { socket: socket.to_path_buf(), waited: start.elapsed(), last_error });
            }
            tokio::time::sleep(Duration::from_millis(200).min(timeout.saturating_sub(start.elapsed()))).await;
        }
    }

    fn content(&self) -> api::content_client::ContentClient<Channel> {
        api::content_client::ContentClient::new(self.channel.clone())
    }

    fn images(&self) -> api::images_client::ImagesClient<Channel> {
        api::images_client::ImagesClient::new(self.channel.clone())
    }

    fn leases(&self) -> api::leases_client::LeasesClient<Channel> {
        api::leases_client::LeasesClient::new(self.channel.clone())
    }

    /// The labels of a blob, or `None` if the namespace does not have it.
    pub async fn content_labels(&self, ns: &str, digest: &Digest) -> Result<Option<HashMap<String, String>>, Status> {
        let req = metadata(api::InfoRequest { digest: digest.to_string() }, ns, None)?;
        let info = not_found(self.content().info(req).await)?;
        Ok(info.map(|r| r.into_inner().info.map(|i| i.labels).unwrap_or_default()))
    }

    /// Sets the given labels on a blob (other labels are kept).
    pub async fn content_set_labels(
        &self,
        ns: &str,
        digest: &Digest,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let info = api::Info {
            digest: digest.to_string(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Default::default()
        };
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = api::UpdateRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) };
        self.content().update(metadata(req, ns, None)?).await?;
        Ok(())
    }

    /// Writes a blob with its expected digest and size (containerd verifies
    /// both on commit), labels set on commit, under `lease`.
    ///
    /// The session opens with a STAT: with containerd's default `shared`
    /// content policy, a blob whose file is already in the local store (put
    /// there by `preseed place`, or by another namespace) is reported at
    /// full offset, and a bare COMMIT registers it without a byte sent. A
    /// WRITE at offset 0 would instead make containerd copy the file aside
    /// and take every byte again.
    ///
    /// With no `bytes`, only a placed file is registered: when the store
    /// has none, the session is dropped unwritten and [`Wrote::NotPlaced`]
    /// returned.
    pub async fn write_blob(
        &self,
        ns: &str,
        lease: &str,
        reference: String,
        desc: &Descriptor,
        bytes: Option<BlobBytes>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Wrote, WriteError> {
        let total = desc.size as i64;
        let expected = desc.digest.to_string();
        let labels: HashMap<String, String> = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // Total and digest go on the STAT and the COMMIT only: containerd
        // looks the digest up again on every message that carries it.
        let message = |action: api::WriteAction, offset: u64, data: Vec<u8>, last: bool| {
            let ends = last || action == api::WriteAction::Stat;
            api::WriteContentRequest {
                action: action as i32,
                r#ref: reference.clone(),
                total: if ends { total } else { 0 },
                expected: if ends { expected.clone() } else { String::new() },
                offset: offset as i64,
                data,
                labels: if last { labels.clone() } else { HashMap::new() },
            }
        };
        // Requests go through a channel so the answer to the STAT decides
        // what follows; two chunks of read-ahead at most.
        let (tx, rx) = tokio::sync::mpsc::channel::<api::WriteContentRequest>(2);
        let requests = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        tx.send(message(api::WriteAction::Stat, 0, Vec::new(), false)).await.expect("receiver is alive");
        let session = async {
            let mut responses = self.content().write(metadata(requests, ns, Some(lease))?).await?.into_inner();
            let stat = responses.message().await?.ok_or_else(|| Status::internal("no answer to STAT"))?;
            Ok::<_, Status>((stat.offset.max(0) as u64, responses))
        };
        let (offset, mut responses) = match session.await {
            Ok(v) => v,
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Wrote::Present),
            Err(s) => return Err(WriteError::Grpc(s)),
        };
        let adopted = desc.size > 0 && offset == desc.size;
        let bytes = match bytes {
            Some(b) => b,
            None if adopted => BlobBytes::Memory(Arc::from(Vec::new())),
            None => {
                // End the session without a byte, then drop its ingest.
                drop(tx);
                while responses.message().await.map_err(WriteError::Grpc)?.is_some() {}
                self.ingest_abort(ns, &reference).await.map_err(WriteError::Grpc)?;
                return Ok(Wrote::NotPlaced);
            }
        };
        // From where the store is (0, or all of it for a placed blob), one
        // message per chunk; the last one commits.
        let size = desc.size;
        let send = async move {
            let mut chunks: Vec<(u64, usize)> =
                (offset..size).step_by(CHUNK).map(|o| (o, (size - o).min(CHUNK as u64) as usize)).collect();
            if chunks.is_empty() {
                chunks.push((size, 0));
            }
            let count = chunks.len();
            for (i, (at, n)) in chunks.into_iter().enumerate() {
                let bytes = bytes.clone();
                let data =
                    if n == 0 { Vec::new() } else { Self::read_chunk(bytes, at, n).await.map_err(WriteError::Read)? };
                let last = i + 1 == count;
                let action = if last { api::WriteAction::Commit } else { api::WriteAction::Write };
                if tx.send(message(action, at, data, last)).await.is_err() {
                    // containerd ended the session; its answer says why.
                    break;
                }
            }
            Ok::<(), WriteError>(())
        };
        let receive = async {
            while responses.message().await?.is_some() {}
            Ok::<(), Status>(())
        };
        // A read error ends the stream without a commit (the ingest goes
        // with the lease); an error from containerd ends the sending.
        tokio::pin!(send, receive);
        let received = tokio::select! {
            r = &mut receive => match r {
                Err(s) => Err(s),
                Ok(()) => { send.await?; Ok(()) }
            },
            sent = &mut send => { sent?; receive.await }
        };
        match received {
            Err(s) if s.code() == Code::AlreadyExists => Ok(Wrote::Present),
            Err(s) => Err(WriteError::Grpc(s)),
            Ok(()) if adopted => Ok(Wrote::Adopted),
            Ok(()) => Ok(Wrote::Streamed),
        }
    }

    /// `n` bytes of a blob from offset `at`, read off the async threads.
    async fn read_chunk(bytes: BlobBytes, at: u64, n: usize) -> std::io::Result<Vec<u8>> {
        tokio::task::spawn_blocking(move || {
            let mut data = vec![0u8; n];
            match &bytes {
                BlobBytes::File { file, offset: base } => file.read_exact_at(&mut data, base + at)?,
                BlobBytes::Memory(m) => data.copy_from_slice(&m[at as usize..at as usize + n]),
            }
            Ok(data)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
    }

    /// containerd's version and revision (Version service).
    pub async fn version(&self) -> Result<(String, String), Status> {
        let mut v = api::version_client::VersionClient::new(self.channel.clone());
        let r = v.version(()).await?.into_inner();
        Ok((r.version, r.revision))
    }

    /// Creates a lease that expires on its own after `expire` (in case the
    /// loader dies before deleting it), with the given extra labels.
    pub async fn lease_create(
        &self,
        ns: &str,
        id: &str,
        expire: Duration,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), Status> {
        let until = std::time::SystemTime::now() + expire;
        let mut labels: HashMap<String, String> = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.insert("containerd.io/gc.expire".to_string(), rfc3339(until));
        let req = api::CreateRequest { id: id.to_string(), labels };
        self.leases().create(metadata(req, ns, None)?).await?;
        Ok(())
    }

    /// The refs of a namespace's active (uncommitted) content writes.
    pub async fn ingests(&self, ns: &str) -> Result<Vec<String>, Status> {
        let req = metadata(api::ListStatusesRequest { filters: vec![] }, ns, None)?;
        Ok(self.content().list_statuses(req).await?.into_inner().statuses.into_iter().map(|s| s.r#ref).collect())
    }

    /// Drops an active content write and its partial data.
    pub async fn ingest_abort(&self, ns: &str, reference: &str) -> Result<(), Status> {
        let req = metadata(api::AbortRequest { r#ref: reference.to_string() }, ns, None)?;
        not_found(self.content().abort(req).await)?;
        Ok(())
    }

    /// Every lease of a namespace: id → labels.
    pub async fn leases_list(&self, ns: &str) -> Result<Vec<(String, HashMap<String, String>)>, Status> {
        let req = metadata(api::ListRequest { filters: vec![] }, ns, None)?;
        let leases = self.leases().list(req).await?.into_inner().leases;
        Ok(leases.into_iter().map(|l| (l.id, l.labels)).collect())
    }

    /// Adds an existing blob to a lease, so GC keeps it until the image record exists.
    pub async fn lease_add_content(&self, ns: &str, id: &str, digest: &Digest) -> Result<(), Status> {
        let resource = api::Resource { id: digest.to_string(), r#type: "content".into() };
        let req = api::AddResourceRequest { id: id.to_string(), resource: Some(resource) };
        self.leases().add_resource(metadata(req, ns, None)?).await?;
        Ok(())
    }

    /// Deletes a lease; `sync` waits for the garbage collection it triggers.
    pub async fn lease_delete(&self, ns: &str, id: &str, sync: bool) -> Result<(), Status> {
        let req = api::DeleteRequest { id: id.to_string(), sync };
        not_found(self.leases().delete(metadata(req, ns, None)?).await)?;
        Ok(())
    }

    /// An image record, if it exists.
    pub async fn image_get(&self, ns: &str, name: &str) -> Result<Option<api::Image>, Status> {
        let req = metadata(api::GetImageRequest { name: name.to_string() }, ns, None)?;
        Ok(not_found(self.images().get(req).await)?.and_then(|r| r.into_inner().image))
    }

    /// Creates an image record.
    pub async fn image_create(&self, ns: &str, image: api::Image) -> Result<(), Status> {
        let req = api::CreateImageRequest { image: Some(image), source_date_epoch: None };
        self.images().create(metadata(req, ns, None)?).await?;
        Ok(())
    }

    /// Updates the given fields (`target`, `labels.<key>`) of an image record.
    ///
    /// `image` must be the whole record (as read, then changed): containerd
    /// ≥1.7 converts the request's record before applying the field mask and
    /// crashes on one without a target. This is how `ctr images label` does it.
    pub async fn image_update(&self, ns: &str, image: api::Image, paths: Vec<String>) -> Result<(), Status> {
        let req = api::UpdateImageRequest {
            image: Some(image),
            update_mask: Some(prost_types::FieldMask { paths }),
            source_date_epoch: None,
        };
        self.images().update(metadata(req, ns, None)?).await?;
        Ok(())
    }

    /// Deletes an image record (its content stays until a GC finds nothing
    /// references it).
    pub async fn image_delete(&self, ns: &str, name: &str) -> Result<(), Status> {
        let req = api::DeleteImageRequest { name: name.to_string(), sync: false, target: None };
        self.images().delete(metadata(req, ns, None)?).await?;
        Ok(())
    }

    /// Every image record of a namespace.
    pub async fn images_list(&self, ns: &str) -> Result<Vec<api::Image>, Status> {
        let req = metadata(api::ListImagesRequest { filters: vec![] }, ns, None)?;
        Ok(self.images().list(req).await?.into_inner().images)
    }

    /// Every namespace.
    pub async fn namespaces(&self) -> Result<Vec<String>, Status> {
        let mut c = api::namespaces_client::NamespacesClient::new(self.channel.clone());
        let resp = c.list(api::ListNamespacesRequest { filter: String::new() }).await?;
        Ok(resp.into_inner().namespaces.into_iter().map(|n| n.name).collect())
    }

    fn snapshots(&self) -> snap::snapshots_client::SnapshotsClient<Channel> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    /// Whether a committed snapshot exists.
    pub async fn snapshot_exists(&self, ns: &str, snapshotter: &str, key: &str) -> Result<bool, Status> {
        let req = snap::StatSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() };
        Ok(not_found(self.snapshots().stat(metadata(req, ns, None)?).await)?.is_some())
    }

    /// Prepares an active snapshot on `parent`, returning its mounts.
    pub async fn snapshot_prepare(
        &self,
        ns: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
        parent: &str,
    ) -> Result<Vec<ctypes::Mount>, Status> {
        let req = snap::PrepareSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        };
        Ok(self.snapshots().prepare(metadata(req, ns, Some(lease))?).await?.into_inner().mounts)
    }

    /// Commits an active snapshot under `name`.
    pub async fn snapshot_commit(
        &self,
        ns: &str,
        lease: &str,
        snapshotter: &str,
        name: &str,
        key: &str,
    ) -> Result<(), Status> {
        let req = snap::CommitSnapshotRequest {
            snapshotter: snapshotter.into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        };
        self.snapshots().commit(metadata(req, ns, Some(lease))?).await?;
        Ok(())
    }

    /// Removes a snapshot.
    pub async fn snapshot_remove(&self, ns: &str, snapshotter: &str, key: &str) -> Result<(), Status> {
        let req = snap::RemoveSnapshotRequest { snapshotter: snapshotter.into(), key: key.into() };
        not_found(self.snapshots().remove(metadata(req, ns, None)?).await)?;
        Ok(())
    }

    /// Applies a layer blob onto mounts; returns the digest of the uncompressed diff.
    /// `sync_fs`: containerd 2.0 and later flush the unpacked files before
    /// answering (older ones ignore the field; [`super::unpack`] flushes them too).
    pub async fn diff_apply(&self, ns: &str, layer: &Descriptor, mounts: Vec<ctypes::Mount>) -> Result<String, Status> {
        let mut c = api::diff_client::DiffClient::new(self.channel.clone());
        let req = api::ApplyRequest { diff: Some(to_wire(layer)), mounts, payloads: HashMap::new(), sync_fs: true };
        let resp = c.apply(metadata(req, ns, None)?).await?.into_inner();
        Ok(resp.applied.map(|d| d.digest).unwrap_or_default())
    }
}

/// What a blob write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wrote {
    /// Its bytes were sent.
    Streamed,
    /// Its file was in containerd's local store already (placed): only
    /// the commit was sent.
    Adopted,
    /// containerd had it in this namespace.
    Present,
    /// Asked to register a placed file only, and the store has none:
    /// nothing was written.
    NotPlaced,
}

/// A blob write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// containerd refused it (digest or size mismatch, …) or went away.
    #[error("{}", describe(.0))]
    Grpc(Status),
    /// Reading the source failed.
    #[error("reading the blob: {0}")]
    Read(#[source] std::io::Error),
}

/// RFC 3339 UTC time with second precision, as containerd's labels expect.
fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
