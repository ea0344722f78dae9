//! Writes each target's seed corpus into `<dir>/<target>/`, from real
//! formats: tarballs planned by the bundler's layout code (plain, gzip,
//! zstd, docker save), the documents of real images with their digests as
//! placeholders, a real `preseed.json`, the repository's `bundles.toml`,
//! containerd configs as shipped, registry requests as containerd and skopeo
//! send them, and verity superblocks as the bundler writes them.
//!
//! `cargo xtask fuzz` runs it before fuzzing (`cargo run --example seeds --
//! <corpus dir> <repo root>`).

use std::path::{Path, PathBuf};

use preseed::partition::index::{BuildInfo, IndexedBlob, IndexedImage, PartitionIndex, INDEX_VERSION};

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().expect("usage: seeds <corpus dir> <repo root>"));
    let repo = PathBuf::from(args.next().expect("usage: seeds <corpus dir> <repo root>"));
    let tmp = tempfile::tempdir().expect("a temp dir");
    let seed = |target: &str, name: &str, bytes: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("seed written");
    };

    let tarball = preseed_fuzz::sample_tarball(&tmp.path().join("cache"));
    seed("tar", "preseed.tar", &tarball);
    seed("tar", "preseed.tar.gz", &preseed_fuzz::gzip(&tarball));
    seed("tar", "preseed.tar.zst", &zstd::encode_all(&tarball[..], 3).expect("in memory"));
    let docker_save = preseed_fuzz::tar_of(&[
        (
            "manifest.json".into(),
            br#"[{"Config":"c.json","RepoTags":["app:1"],"Layers":["l/layer.tar"]}]"#.to_vec(),
        ),
        ("c.json".into(), br#"{"rootfs":{"type":"layers","diff_ids":["sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"]}}"#.to_vec()),
        ("l/layer.tar".into(), vec![0; 1024]),
    ]);
    seed("tar", "docker-save.tar", &docker_save);

    // Documents of real images, children after parents, digests as `@N`.
    let index = r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"@1","size":#1,"annotations":{"io.containerd.image.name":"registry.example/app:1","org.opencontainers.image.ref.name":"1"}}]}"#;
    let nested = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@2","size":#2,"platform":{"os":"linux","architecture":"amd64"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@2","size":#2,"platform":{"os":"linux","architecture":"arm64"}}]}"#;
    let manifest = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@3","size":#3},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"@4","size":#4}]}"#;
    let config = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let docs = [index, nested, manifest, config, "layer bytes"].join("\0");
    seed("image", "oci-index", docs.as_bytes());
    let single = [r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"@1","size":#1,"annotations":{"io.containerd.image.name":"docker.io/library/app:1"}}]}"#, &manifest.replace("@2", "@1").replace("#2", "#1").replace("@3", "@2").replace("#3", "#2").replace("@4", "@3").replace("#4", "#3"), config, "layer"].join("\0");
    seed("image", "oci-manifest", single.as_bytes());
    let save = [r#"[{"Config":"f1","RepoTags":["app:1"],"Layers":["f2"]}]"#, r#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#, "layer"].join("\0");
    seed("image", "docker-save", save.as_bytes());

    let digest = |b: &[u8]| preseed::digest::Digest::of(b);
    let image = |ns: &str, file: &str, name: &str| IndexedImage {
        namespace: ns.into(),
        file: file.into(),
        path: format!("{ns}/{file}.tar"),
        name: name.into(),
        names: vec![format!("{name}-extra")],
        digest: digest(name.as_bytes()),
        media_type: preseed::oci::OCI_INDEX.into(),
        platforms: vec!["linux/amd64".into()],
        pin: true,
        sandbox: file == "pause",
        boot: true,
        size: 4096,
        sha256: digest(file.as_bytes()),
        signed_by: None,
        blobs: vec![IndexedBlob { digest: digest(b"blob"), size: 4 }],
        referrers: Vec::new(),
    };
    let index = PartitionIndex {
        version: INDEX_VERSION,
        images: vec![
            image("k8s.io", "pause", "registry.k8s.io/pause:3.10"),
            image("default", "app", "registry.example/app:1"),
        ],
        build: BuildInfo { tool: "preseed 0.1.0".into(), format: "erofs".into() },
        verity: None,
    };
    seed("index", "preseed.json", &index.to_json());
    if let Ok(real) = std::fs::read(repo.join("target/preseed/preseed.json")) {
        seed("index", "bundled.json", &real);
    }

    let plan = r#"{"version":1,"writer":"preseed 0.1.0","format":"erofs","data_bytes":20480,"verity":{"salt":"0000000000000000000000000000000000000000000000000000000000000000","uuid":"00000000000000000000000000000000","root_hash":"0000000000000000000000000000000000000000000000000000000000000000"},"blobs":[{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":5000}],"pieces":[{"blob":0,"from":0,"at":4096,"len":4096},{"blob":0,"from":4096,"at":8192,"len":904}],"image":{"size":28672,"sha256":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"rest":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":10,"bytes":15480}}"#;
    seed("release", "plan.json", plan.as_bytes());
    if let Ok(real) = std::fs::read(repo.join("target/preseed/preseed.plan.json")) {
        seed("release", "bundled.json", &real);
    }

    for (name, request) in [
        ("base", "GET\n/v2/\n"),
        ("catalog", "GET\n/v2/_catalog?n=1&last=a\n"),
        ("tags", "GET\n/v2/app/tags/list?ns=registry.example\n"),
        ("tag", "HEAD\n/v2/registry.example/app/manifests/1\n"),
        ("mirror", "GET\n/v2/library/app/manifests/latest?ns=docker.io\n"),
        ("encoded", "GET\n/v2/library%2Fapp/tags/list?n=%31\n"),
        (
            "range",
            "GET\n/v2/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000\nbytes=0-10",
        ),
        ("upload", "POST\n/v2/app/blobs/uploads/\n"),
    ] {
        seed("serve", name, request.as_bytes());
    }

    let sb = preseed::partition::verity::superblock(300, &[5; 32], &[6; 16]);
    seed("verity", "superblock", &sb);
    seed("verity", "roothash", format!("{}\n", "ab".repeat(32)).as_bytes());
    seed("verity", "cmdline", format!("root=/dev/vda1 ro preseed.roothash={} quiet\n", "cd".repeat(32)).as_bytes());
    let mut erofs_head = vec![0u8; 8192];
    erofs_head[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
    erofs_head[1024 + 12] = 12;
    erofs_head[1024 + 36..1024 + 40].copy_from_slice(&1u32.to_le_bytes());
    erofs_head[4096..8192].copy_from_slice(&sb);
    seed("verity", "erofs-with-tree", &erofs_head);

    // trust: a signature manifest, a sigstore bundle, a simple-signing payload.
    let hex = "ab".repeat(32);
    seed(
        "trust",
        "bundle-manifest",
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"application/vnd.dev.sigstore.bundle.v0.3+json","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:{hex}","size":2}},"layers":[{{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","digest":"sha256:{hex}","size":900}}],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{hex}","size":500}}}}"#
        )
        .as_bytes(),
    );
    seed(
        "trust",
        "sig-manifest",
        format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{hex}","size":2}},"layers":[{{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"sha256:{hex}","size":250,"annotations":{{"dev.cosignproject.cosign/signature":"MEUCIQ=="}}}}]}}"#
        )
        .as_bytes(),
    );
    let statement = format!(
        r#"{{"_type":"https://in-toto.io/Statement/v1","subject":[{{"name":"x","digest":{{"sha256":"{hex}"}}}}],"predicateType":"https://sigstore.dev/cosign/sign/v1","predicate":{{}}}}"#
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(statement.as_bytes());
    seed(
        "trust",
        "sigstore-bundle",
        format!(
            r#"{{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{{"publicKey":{{"hint":"q83vq83vq83vq83vq83vq83vq83vq83vq83vq83vq80="}}}},"dsseEnvelope":{{"payload":"{b64}","payloadType":"application/vnd.in-toto+json","signatures":[{{"sig":"MEUCIQ=="}}]}}}}"#
        )
        .as_bytes(),
    );
    seed(
        "trust",
        "simple-signing",
        format!(
            r#"{{"critical":{{"identity":{{"docker-reference":"r/x"}},"image":{{"docker-manifest-digest":"sha256:{hex}"}},"type":"cosign container image signature"}},"optional":null}}"#
        )
        .as_bytes(),
    );

    seed_file(&seed, "manifest", &repo.join("bundles.toml"));
    seed(
        "manifest",
        "full",
        br#"[partition]
format = "erofs"
platforms = ["linux/amd64", "linux/arm64/v8"]
verity = true

[registries."127.0.0.1:5000"]
insecure = true
mirrors = ["mirror.internal:5000"]

[[image]]
ref = "registry.k8s.io/pause:3.10@sha256:ee6521f290b2168b6e0935a181d4cff9be1ac3f505666ef0e3c98fae8199917a"
namespace = "k8s.io"
sandbox = true
names = ["registry.local/pause:3.10"]

[[image]]
build = "hello"
ref = "preseed.local/hello:0.1"
platforms = ["linux/amd64"]
"#,
    );

    seed(
        "containerd_config",
        "v2",
        br#"version = 2
root = "/var/lib/containerd"
imports = ["/etc/containerd/conf.d/*.toml"]
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "shared"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
"#,
    );
    seed(
        "containerd_config",
        "v3",
        br#"version = 3
root = "/data/containerd"
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
[proxy_plugins.store]
  type = "content"
  address = "/run/store.sock"
"#,
    );
}

fn seed_file(seed: &dyn Fn(&str, &str, &[u8]), target: &str, path: &Path) {
    if let Ok(bytes) = std::fs::read(path) {
        seed(target, &path.file_name().expect("a file name").to_string_lossy(), &bytes);
    }
}
