//! Offline images: `slipway image import NAME DIR|TAR`. A directory is a root filesystem, packed
//! as one uncompressed layer into an OCI image layout archive (image-spec `image-layout.md`:
//! `oci-layout`, `index.json`, `blobs/sha256/<digest>`) with a config carrying Entrypoint, Cmd,
//! Env and WorkingDir; a tar is an existing OCI or docker archive. Either is imported into a
//! containerd with Debian's `ctr`, under the CRI plugin's namespace, so a Pod names it with
//! `imagePullPolicy: Never` and nothing is pulled from a registry.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::PodsError;

/// The containerd namespace the CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// What a container runs by default, as an image config's `config` (image-spec `config.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=value` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// The fully qualified reference a CRI runtime resolves `name` to, as kubelet and containerd
/// normalise it (docker reference grammar): `busybox` is `docker.io/library/busybox:latest`,
/// `example.com:5000/x` keeps its registry and gets `:latest`.
pub fn normalize(name: &str) -> Result<String, PodsError> {
    let bad = |reason: &str| PodsError::Invalid {
        field: "NAME".to_owned(),
        reason: format!("{name:?}: {reason}"),
    };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || "._-/:@".contains(c)) || c.is_ascii_uppercase())
    {
        return Err(bad(
            "may hold only lower-case letters, digits and . _ - / : @",
        ));
    }
    let (first, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), rest.to_owned())
        }
        Some(_) => ("docker.io".to_owned(), name.to_owned()),
        None => ("docker.io".to_owned(), format!("library/{name}")),
    };
    if rest.is_empty() || rest.split('/').any(str::is_empty) {
        return Err(bad("has an empty path component"));
    }
    let last = rest.rsplit('/').next().unwrap_or_default();
    let tagged = last.contains(':') || last.contains('@');
    Ok(if tagged {
        format!("{first}/{rest}")
    } else {
        format!("{first}/{rest}:latest")
    })
}

/// Packs `rootfs` as a one-layer OCI image named `name` into the archive `out`; returns the
/// manifest's digest (`sha256:...`).
pub fn build_archive(
    name: &str,
    rootfs: &Path,
    config: &ImageConfig,
    out: &Path,
) -> Result<String, PodsError> {
    let reference = normalize(name)?;
    if !rootfs.is_dir() {
        return Err(PodsError::Invalid {
            field: "DIR".to_owned(),
            reason: format!("{} is not a directory", rootfs.display()),
        });
    }
    let io_err = |what: &'static str| move |source: io::Error| PodsError::Io { what, source };
    // The layer goes to a scratch file first: its digest names it in the archive.
    let layer_path = out.with_extension("layer.tmp");
    let mut layer = tempfile_at(&layer_path).map_err(io_err("create the layer file"))?;
    {
        let mut builder = tar::Builder::new(BufWriter::new(&mut layer));
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Deterministic);
        builder
            .append_dir_all(".", rootfs)
            .map_err(io_err("pack the root filesystem"))?;
        builder
            .into_inner()
            .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
            .and_then(|f| f.flush())
            .map_err(io_err("write the layer"))?;
    }
    layer.rewind().map_err(io_err("rewind the layer"))?;
    let (layer_digest, layer_size) = digest_reader(&mut layer).map_err(io_err("hash the layer"))?;
    let image_config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": non_empty(&config.entrypoint),
            "Cmd": non_empty(&config.cmd),
            "Env": non_empty(&config.env),
            "WorkingDir": config.working_dir.clone().unwrap_or_default(),
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": "slipway image import" }],
    });
    let config_bytes = serde_json::to_vec(&image_config).map_err(PodsError::Json)?;
    let config_digest = digest_bytes(&config_bytes);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": { "mediaType": CONFIG, "digest": config_digest, "size": config_bytes.len() },
        "layers": [{ "mediaType": LAYER, "digest": layer_digest, "size": layer_size }],
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(PodsError::Json)?;
    let manifest_digest = digest_bytes(&manifest_bytes);
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .filter(|t| !t.contains('/'))
        .unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let index_bytes = serde_json::to_vec(&index).map_err(PodsError::Json)?;

    let file = File::create(out).map_err(io_err("create the image archive"))?;
    let mut archive = tar::Builder::new(BufWriter::new(file));
    let mut add = |path: &str, bytes: &[u8]| -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        archive.append_data(&mut header, path, bytes)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .and_then(|()| add("index.json", &index_bytes))
        .and_then(|()| add(&blob_path(&manifest_digest), &manifest_bytes))
        .and_then(|()| add(&blob_path(&config_digest), &config_bytes))
        .map_err(io_err("write the image archive"))?;
    layer.rewind().map_err(io_err("rewind the layer"))?;
    let mut header = tar::Header::new_gnu();
    header.set_size(layer_size);
    header.set_mode(0o644);
    header.set_cksum();
    archive
        .append_data(&mut header, blob_path(&layer_digest), &mut layer)
        .and_then(|()| archive.into_inner())
        .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
        .and_then(|f| f.sync_all())
        .map_err(io_err("write the image archive"))?;
    drop(layer);
    let _ = std::fs::remove_file(&layer_path);
    Ok(manifest_digest)
}

/// Imports the OCI or docker archive `archive` into the containerd at `socket` (namespace
/// [`CRI_NAMESPACE`]) and, when `name` is given, tags what it held as `name`. Returns the names
/// `ctr` unpacked.
pub fn import_archive(
    socket: &Path,
    archive: &Path,
    name: Option<&str>,
) -> Result<Vec<String>, PodsError> {
    let reference = name.map(normalize).transpose()?;
    let out = ctr(
        socket,
        &["images", "import", &archive.display().to_string()],
    )?;
    // "unpacking docker.io/library/busybox:latest (sha256:...)...done"
    let imported: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("unpacking "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    if let Some(reference) = reference {
        match imported.as_slice() {
            [] => {
                return Err(PodsError::Invalid {
                    field: "TAR".to_owned(),
                    reason: format!("{} holds no image ctr could unpack", archive.display()),
                });
            }
            [only] if *only == reference => {}
            [first, ..] => {
                ctr(socket, &["images", "tag", "--force", first, &reference])?;
            }
        }
        return Ok(vec![reference]);
    }
    Ok(imported)
}

/// `slipway image import NAME DIR|TAR`: builds (for a directory) and imports the image.
pub fn import(
    socket: &Path,
    name: &str,
    source: &Path,
    config: &ImageConfig,
) -> Result<String, PodsError> {
    let reference = normalize(name)?;
    let meta = std::fs::metadata(source).map_err(|e| PodsError::Invalid {
        field: "DIR|TAR".to_owned(),
        reason: format!("{}: {e}", source.display()),
    })?;
    if meta.is_dir() {
        let scratch = std::env::temp_dir().join(format!(
            "slipway-image-{}-{}.tar",
            std::process::id(),
            reference.replace(['/', ':', '@'], "_")
        ));
        let built = build_archive(name, source, config, &scratch);
        let imported = built.and_then(|_| import_archive(socket, &scratch, Some(name)));
        let _ = std::fs::remove_file(&scratch);
        imported?;
    } else {
        if *config != ImageConfig::default() {
            return Err(PodsError::Invalid {
                field: "--entrypoint/--cmd/--env/--workdir".to_owned(),
                reason: "apply only to a directory; an archive carries its own config".to_owned(),
            });
        }
        import_archive(socket, source, Some(name))?;
    }
    Ok(reference)
}

/// Runs Debian's `ctr` against the containerd at `socket` in the CRI namespace.
fn ctr(socket: &Path, args: &[&str]) -> Result<String, PodsError> {
    let output = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", CRI_NAMESPACE])
        .args(args)
        .output()
        .map_err(|source| PodsError::Spawn {
            program: "ctr (Debian package containerd)",
            source,
        })?;
    if !output.status.success() {
        return Err(PodsError::Command {
            command: format!("ctr {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn non_empty(items: &[String]) -> Value {
    if items.is_empty() {
        Value::Null
    } else {
        json!(items)
    }
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

fn digest_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn digest_reader(reader: &mut impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex(&hasher.finalize())), size))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A read-write file at `path`, removed from the directory at once (only the handle keeps it).
fn tempfile_at(path: &PathBuf) -> io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    std::fs::remove_file(path)?;
    Ok(file)
}

/// A busybox root filesystem in `dir`: Debian's `/usr/bin/busybox` (package busybox-static) as
/// `/bin/busybox` with a symlink per applet, and the directories programs expect.
pub fn busybox_rootfs(dir: &Path) -> Result<(), PodsError> {
    let io_err = |what: &'static str| move |source: io::Error| PodsError::Io { what, source };
    for sub in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io_err("create the rootfs directories"))?;
    }
    std::fs::copy("/usr/bin/busybox", dir.join("bin/busybox")).map_err(io_err(
        "copy /usr/bin/busybox (Debian package busybox-static)",
    ))?;
    let list = Command::new("/usr/bin/busybox")
        .arg("--list")
        .output()
        .map_err(|source| PodsError::Spawn {
            program: "/usr/bin/busybox",
            source,
        })?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dir.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(io_err("link a busybox applet"))?;
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .and_then(|()| std::fs::write(dir.join("etc/group"), "root:x:0:\n"))
        .map_err(io_err("write /etc/passwd"))?;
    Ok(())
}

/// The host binaries the tools image carries (Debian packages nginx-light, iperf3, fio, socat
/// where installed): the workloads the demo and the benchmarks run.
pub const TOOLS: [&str; 4] = [
    "/usr/sbin/nginx",
    "/usr/bin/iperf3",
    "/usr/bin/fio",
    "/usr/bin/socat",
];

/// nginx in the tools image: in the foreground, logging to the container's stdout and stderr,
/// answering every path with the pod's name on port 80.
const NGINX_CONF: &str = "daemon off;
user root;
worker_processes 1;
pid /run/nginx.pid;
error_log stderr;
events { worker_connections 256; }
http {
    access_log /dev/stdout;
    server {
        listen 80;
        location / { default_type text/plain; return 200 \"$hostname\\n\"; }
    }
}
";

/// A tools root filesystem in `dir`: busybox ([`busybox_rootfs`]) and those of `binaries` that
/// exist on this machine, each with the shared libraries and loader `ldd` names, at the same
/// paths; nginx with a configuration for containers. Returns the binaries it took.
pub fn tools_rootfs(dir: &Path, binaries: &[&str]) -> Result<Vec<String>, PodsError> {
    let io_err = |what: &'static str| move |source: io::Error| PodsError::Io { what, source };
    busybox_rootfs(dir)?;
    let mut taken = Vec::new();
    for binary in binaries.iter().map(Path::new).filter(|b| b.exists()) {
        let ldd = Command::new("ldd")
            .arg(binary)
            .output()
            .map_err(|source| PodsError::Spawn {
                program: "ldd",
                source,
            })?;
        let mut files = vec![binary.to_path_buf()];
        files.extend(shared_objects(&String::from_utf8_lossy(&ldd.stdout)));
        for file in files {
            let target = dir.join(file.strip_prefix("/").unwrap_or(&file));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err("create a tools directory"))?;
            }
            std::fs::copy(&file, &target).map_err(io_err("copy a host binary or library"))?;
        }
        taken.push(binary.display().to_string());
    }
    for sub in ["etc/nginx", "var/lib/nginx/body", "var/log/nginx", "run"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io_err("create the nginx directories"))?;
    }
    std::fs::write(dir.join("etc/nginx/nginx.conf"), NGINX_CONF)
        .map_err(io_err("write nginx.conf"))?;
    Ok(taken)
}

/// The images a host without a registry starts with, as archives in `dir` for the agent's
/// --image-dir: `busybox` (Cmd `sh`), the sandbox's `pause:local` from the same root
/// filesystem, and `tools` ([`tools_rootfs`]).
pub fn build_node_images(dir: &Path) -> Result<(), PodsError> {
    let io_err = |what: &'static str| move |source: io::Error| PodsError::Io { what, source };
    let scratch = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&scratch);
    let busybox = scratch.join("busybox");
    let tools = scratch.join("tools");
    busybox_rootfs(&busybox)?;
    tools_rootfs(&tools, &TOOLS)?;
    let config = |entrypoint: &[&str], cmd: &[&str]| ImageConfig {
        entrypoint: entrypoint.iter().map(|s| (*s).to_owned()).collect(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        env: Vec::new(),
        working_dir: None,
    };
    build_archive(
        "busybox",
        &busybox,
        &config(&[], &["sh"]),
        &dir.join("busybox.tar"),
    )?;
    build_archive(
        "pause:local",
        &busybox,
        &config(&["/bin/sleep"], &["2147483647"]),
        &dir.join("pause.tar"),
    )?;
    build_archive(
        "tools",
        &tools,
        &config(&[], &["sh"]),
        &dir.join("tools.tar"),
    )?;
    std::fs::remove_dir_all(&scratch).map_err(io_err("remove the image scratch dir"))
}

/// The files `ldd` output names: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn shared_objects(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: chroot; run with --ignored"
    )]
    fn the_tools_rootfs_runs_its_binaries_on_their_own() {
        let dir = std::env::temp_dir().join(format!("slipway-tools-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let taken = tools_rootfs(&dir, &TOOLS).expect("tools rootfs");
        assert!(taken.contains(&"/usr/sbin/nginx".to_owned()), "{taken:?}");
        // Inside the root filesystem alone, nginx loads and accepts its configuration.
        let out = Command::new("chroot")
            .arg(&dir)
            .args(["/usr/sbin/nginx", "-t"])
            .output()
            .expect("chroot");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn ldd_output_names_libraries_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibpcre2-8.so.0 => /lib/x86_64-linux-gnu/libpcre2-8.so.0 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibmissing.so => not found\n";
        assert_eq!(
            shared_objects(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libpcre2-8.so.0"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn names_are_normalised_as_docker_references() {
        assert_eq!(
            normalize("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize("pause:local").unwrap(),
            "docker.io/library/pause:local"
        );
        assert_eq!(
            normalize("slipway/tools").unwrap(),
            "docker.io/slipway/tools:latest"
        );
        assert_eq!(
            normalize("localhost:5000/x/y:1").unwrap(),
            "localhost:5000/x/y:1"
        );
        assert_eq!(normalize("example.com/x").unwrap(), "example.com/x:latest");
        for bad in ["", "Busybox", "a//b", "x y", "a/"] {
            let err = normalize(bad).unwrap_err().to_string();
            assert!(err.contains("NAME"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_directory_becomes_an_oci_layout_whose_digests_check() {
        let dir = std::env::temp_dir().join(format!("slipway-image-unit-{}", std::process::id()));
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/hello"), "#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("hello", rootfs.join("bin/hi")).unwrap();
        let out = dir.join("image.tar");
        let config = ImageConfig {
            cmd: vec!["/bin/hello".into()],
            env: vec!["A=b".into()],
            ..ImageConfig::default()
        };
        let digest = build_archive("hello:1", &rootfs, &config, &out).unwrap();

        let mut blobs = std::collections::HashMap::new();
        let mut archive = tar::Archive::new(File::open(&out).unwrap());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            blobs.insert(path, bytes);
        }
        let index: Value = serde_json::from_slice(&blobs["index.json"]).unwrap();
        assert_eq!(index["manifests"][0]["digest"], digest);
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "docker.io/library/hello:1"
        );
        // Every blob is named by its content's digest, and sizes match.
        for (path, bytes) in &blobs {
            if let Some(hex_digest) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(digest_bytes(bytes), format!("sha256:{hex_digest}"));
            }
        }
        let manifest: Value = serde_json::from_slice(&blobs[&blob_path(&digest)]).unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap();
        let image: Value = serde_json::from_slice(&blobs[&blob_path(config_digest)]).unwrap();
        assert_eq!(image["config"]["Cmd"], json!(["/bin/hello"]));
        assert_eq!(image["config"]["Env"], json!(["A=b"]));
        assert_eq!(image["config"]["Entrypoint"], Value::Null);
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        assert_eq!(image["rootfs"]["diff_ids"][0], layer_digest);
        // The layer holds the file and the symlink as a symlink.
        let layer = &blobs[&blob_path(layer_digest)];
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        let mut names = Vec::new();
        for entry in tar::Archive::new(layer.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            let kind = entry.header().entry_type();
            names.push((
                entry.path().unwrap().display().to_string(),
                kind.is_symlink(),
            ));
        }
        assert!(names.contains(&("bin/hello".into(), false)), "{names:?}");
        assert!(names.contains(&("bin/hi".into(), true)), "{names:?}");
        // A missing directory is refused, naming the argument.
        let err = build_archive("x", &dir.join("nope"), &config, &out).unwrap_err();
        assert!(err.to_string().contains("DIR"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `slipway image ...`: offline images for the host's containerd.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Import an image: a DIR (a root filesystem, packed as a one-layer OCI image with the
    /// given Entrypoint/Cmd/Env) or a TAR (an OCI or docker archive), named NAME.
    Import(ImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The image's name (`busybox`, `pause:local`, `example.com/tools:1`).
    pub name: String,
    /// A root filesystem directory, or an OCI/docker image archive.
    pub source: PathBuf,
    /// The containerd to import into (its gRPC socket); images go to namespace k8s.io.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_socket: PathBuf,
    /// The image's Entrypoint, one argument per flag (DIR only).
    #[arg(long = "entrypoint", value_name = "ARG")]
    pub entrypoint: Vec<String>,
    /// The image's Cmd, one argument per flag (DIR only).
    #[arg(long = "cmd", value_name = "ARG")]
    pub cmd: Vec<String>,
    /// An environment variable NAME=value (DIR only; repeat the flag).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// The image's WorkingDir (DIR only).
    #[arg(long = "workdir")]
    pub working_dir: Option<String>,
}

impl ImageCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Import(args) => {
                for (i, env) in args.env.iter().enumerate() {
                    if env.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                        anyhow::bail!("--env[{i}]: {env:?} is not NAME=VALUE");
                    }
                }
                let config = ImageConfig {
                    entrypoint: args.entrypoint,
                    cmd: args.cmd,
                    env: args.env,
                    working_dir: args.working_dir,
                };
                let reference = import(&args.containerd_socket, &args.name, &args.source, &config)
                    .map_err(|e| anyhow::anyhow!(super::error_chain(&e)))?;
                println!("{reference}");
                Ok(())
            }
        }
    }
}
