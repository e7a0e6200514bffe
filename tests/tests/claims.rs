//! Paravirtual volumes end to end: a PersistentVolumeClaim applied with kubectl to a provisioned
//! workload cluster becomes, through the cluster's pvCSI controller and its link, a claim in the
//! cluster's supervisor namespace, a volume on its zone's storage host and a bound PV; the
//! attach-detach controller and the attacher attach it to the node of the Pod that mounts it,
//! and the node's agent stages and publishes it through its CSI node plugin (NBD over TLS with
//! the host's certificate, FUSE, loop device, ext4). A Pod writes a file; it is deleted and a
//! Pod on another host of the zone (placed by the scheduler, held to the volume's zone) reads
//! the same bytes. A raw block claim (volumeMode Block) is a device in a Pod where fio writes
//! and verifies. Deleting the claims removes the volumes, and no mount is left.
//! Privileged (root, netns, cgroups, BPF, containerd, FUSE, loop devices): run with --ignored.

mod common;

use std::time::{Duration, Instant};

use common::{World, client_for, pod_log, wait_for};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, ListParams};
use slipway_agent::pods::image::build_node_images;
use slipway_hosts::reconciler::netns_node_flags;

const SUPERVISOR_CLASS: &str = r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: csi.slipway.dev
allowVolumeExpansion: true
"#;

const WORKLOAD_CLAIM: &str = r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: standard}
provisioner: csi.slipway.dev
parameters: {svStorageClass: fast}
allowedTopologies:
- matchLabelExpressions: [{key: topology.slipway.dev/zone, values: [za]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: standard
  resources: {requests: {storage: 256Mi}}
"#;

/// A VolumeSnapshot of claim `data`, a claim restored from it and a clone of `data`.
const SNAPSHOT_AND_CLONE: &str = r#"
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: data-snap, namespace: default}
spec:
  source: {persistentVolumeClaimName: data}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: restored, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: standard
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: data-snap}
  resources: {requests: {storage: 256Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: cloned, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: standard
  dataSource: {kind: PersistentVolumeClaim, name: data}
  resources: {requests: {storage: 256Mi}}
"#;

/// An xfs class that allows expansion (ext4 grows online only with CAP_SYS_RESOURCE, which
/// this machine's container does not grant), and a claim of it.
const GROWING: &str = r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: growing}
provisioner: csi.slipway.dev
parameters: {svStorageClass: fast, csi.storage.k8s.io/fstype: xfs}
allowVolumeExpansion: true
allowedTopologies:
- matchLabelExpressions: [{key: topology.slipway.dev/zone, values: [za]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: grow, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: growing
  resources: {requests: {storage: 320Mi}}
"#;

const RAW_CLAIM: &str = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: raw, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Block
  storageClassName: standard
  resources: {requests: {storage: 64Mi}}
"#;

/// fio from the tools image on claim `raw` as a raw device: random 4k writes then a crc32c
/// verify of every block.
const RAW_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: fio, namespace: default}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  volumes: [{name: raw, persistentVolumeClaim: {claimName: raw}}]
  containers:
  - name: fio
    image: tools
    imagePullPolicy: Never
    command: [/usr/bin/fio, --name=verify, --filename=/dev/xvda, --rw=randwrite, --bs=4k,
      --size=16M, --direct=1, --ioengine=psync, --verify=crc32c, --do_verify=1]
    volumeDevices: [{name: raw, devicePath: /dev/xvda}]
"#;

/// A pod placed by `placement` (YAML lines of its spec) that runs `script` with claim `claim`
/// at /data (restartPolicy Never).
fn claim_pod(name: &str, claim: &str, placement: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         {placement}\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  \
         volumes: [{{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}]\n  containers:\n  \
         - name: sh\n    image: busybox\n    imagePullPolicy: Never\n    command: [sh, -c, {script:?}]\n    \
         volumeMounts: [{{name: data, mountPath: /data}}]\n"
    )
}

/// The phase pod `name` ends in; at the deadline a panic with its status and the cluster's
/// VolumeAttachments.
async fn finished(pods: &Api<Pod>, name: &str) -> String {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let pod = pods.get(name).await.ok();
        if let Some(phase) = pod
            .as_ref()
            .and_then(|p| p.status.as_ref()?.phase.clone())
            .filter(|p| p == "Succeeded" || p == "Failed")
        {
            return phase;
        }
        if Instant::now() > end {
            let attachments: Api<VolumeAttachment> = Api::all(pods.clone().into_client());
            let vas = attachments
                .list(&ListParams::default())
                .await
                .map(|l| l.items);
            panic!(
                "pod {name} did not finish: {}\nVolumeAttachments: {}",
                serde_json::to_string_pretty(&pod.and_then(|p| p.status)).unwrap_or_default(),
                serde_json::to_string_pretty(&vas.ok()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups + BPF + containerd + FUSE + loop devices; run with --ignored"]
async fn a_claim_is_provisioned_by_the_supervisor_and_follows_its_pod_to_another_host() {
    let scratch = tempfile::Builder::new()
        .prefix("slipway-e2e-images-")
        .tempdir()
        .expect("dir");
    build_node_images(scratch.path()).expect("images");
    let world = World::with_flags(
        netns_node_flags(scratch.path()),
        vec![
            "--storage-hosts".into(),
            "--storage-host-memory".into(),
            (256u64 << 20).to_string(),
        ],
    );
    let client = world.client().await;
    world.apply(SUPERVISOR_CLASS);
    let path = world
        .workload_cluster(&client, "{limits: {storage: 4Gi}}")
        .await;
    let workload = client_for(&path).await;

    // Two hosts of zone za: the volume's zone.
    let nodes: Vec<String> = Api::<Node>::all(workload.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
        .into_iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("topology.kubernetes.io/zone"))
                .is_some_and(|z| z == "za")
        })
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(nodes.len() >= 2, "two hosts in zone za: {nodes:?}");

    // The claim is bound through the supervisor: a claim in team-w, a volume, a PV.
    let started = Instant::now();
    world.apply_with(&path, WORKLOAD_CLAIM);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(workload.clone(), "default");
    let pv = wait_for("claim data Bound", Duration::from_secs(60), || async {
        let c = claims.get("data").await.ok()?;
        (c.status?.phase.as_deref() == Some("Bound")).then_some(())?;
        c.spec?.volume_name
    })
    .await;
    eprintln!("PVC applied → Bound in {:?} (PV {pv})", started.elapsed());
    let supervisor_claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "team-w");
    let mirrored = supervisor_claims
        .list(&ListParams::default())
        .await
        .expect("supervisor claims")
        .items;
    assert_eq!(mirrored.len(), 1, "one claim in the supervisor namespace");

    // A pod on the first host writes; deleted, a pod on the second host reads the same bytes.
    let pods: Api<Pod> = Api::namespaced(workload.clone(), "default");
    let started = Instant::now();
    world.apply_with(
        &path,
        &claim_pod(
            "writer",
            "data",
            &format!("nodeName: {}", nodes[0]),
            "echo kept-across-hosts > /data/note && sync && grep -q ' /data ext4 ' /proc/mounts",
        ),
    );
    let phase = finished(&pods, "writer").await;
    assert_eq!(
        phase,
        "Succeeded",
        "writer: {}",
        pod_log(&world, &nodes[0], "writer")
    );
    eprintln!(
        "pod with the claim: created → written and done in {:?}",
        started.elapsed()
    );
    pods.delete("writer", &DeleteParams::default())
        .await
        .expect("delete writer");
    let started = Instant::now();
    world.apply_with(
        &path,
        &claim_pod(
            "reader",
            "data",
            // Any node but the writer's: the scheduler must pick one in the volume's zone.
            &format!(
                "affinity: {{nodeAffinity: {{requiredDuringSchedulingIgnoredDuringExecution: \
                 {{nodeSelectorTerms: [{{matchExpressions: [{{key: kubernetes.io/hostname, \
                 operator: NotIn, values: [{}]}}]}}]}}}}}}",
                nodes[0]
            ),
            "test \"$(cat /data/note)\" = kept-across-hosts",
        ),
    );
    let phase = finished(&pods, "reader").await;
    let reader_node = pods
        .get("reader")
        .await
        .ok()
        .and_then(|p| p.spec?.node_name)
        .expect("the reader was scheduled");
    assert_eq!(
        phase,
        "Succeeded",
        "reader on {reader_node}: {}",
        pod_log(&world, &reader_node, "reader")
    );
    assert!(
        reader_node != nodes[0] && nodes.contains(&reader_node),
        "the reader went to {reader_node}, not another node of the volume's zone: {nodes:?}"
    );
    eprintln!(
        "the claim moved hosts: reader created → read the writer's bytes in {:?}",
        started.elapsed()
    );

    // The workload cluster holds no credential for the block store or the supervisor: its
    // PVs, VolumeAttachments, StorageClasses and Secrets name volumes, addresses and classes,
    // never a key or a token (the cluster's link to its namespace lives on its control plane
    // host, not in its API).
    let mut objects = Vec::new();
    objects.push(serde_json::to_string(
        &Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(workload.clone())
            .list(&ListParams::default())
            .await
            .expect("PVs")
            .items,
    ));
    objects.push(serde_json::to_string(
        &Api::<VolumeAttachment>::all(workload.clone())
            .list(&ListParams::default())
            .await
            .expect("VolumeAttachments")
            .items,
    ));
    objects.push(serde_json::to_string(
        &Api::<k8s_openapi::api::storage::v1::StorageClass>::all(workload.clone())
            .list(&ListParams::default())
            .await
            .expect("StorageClasses")
            .items,
    ));
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::all(workload.clone())
        .list(&ListParams::default())
        .await
        .expect("Secrets")
        .items;
    for secret in &secrets {
        for value in secret.data.iter().flatten().map(|(_, v)| &v.0) {
            objects.push(Ok(String::from_utf8_lossy(value).into_owned()));
        }
    }
    let link = std::fs::read_to_string(
        world
            .dir
            .path()
            .join("sup/hosts/data/team-w-w1-control-plane-0/supervisor-link.kubeconfig"),
    )
    .expect("the control plane host's link");
    let link_key = link
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-key-data:"))
        .map(str::trim)
        .expect("the link's key");
    for text in objects {
        let text = text.expect("serialize");
        assert!(
            !text.contains("PRIVATE KEY") && !text.contains(link_key) && !text.contains("token"),
            "a credential in the workload cluster's objects: {}",
            text.chars().take(400).collect::<String>()
        );
    }

    // A raw block claim (volumeMode Block): fio writes it through the device and verifies.
    world.apply_with(&path, RAW_CLAIM);
    wait_for("claim raw Bound", Duration::from_secs(60), || async {
        let c = claims.get("raw").await.ok()?;
        (c.status?.phase.as_deref() == Some("Bound")).then_some(())
    })
    .await;
    let started = Instant::now();
    world.apply_with(&path, RAW_POD);
    let phase = finished(&pods, "fio").await;
    let fio_node = pods
        .get("fio")
        .await
        .ok()
        .and_then(|p| p.spec?.node_name)
        .expect("fio was scheduled");
    let log = pod_log(&world, &fio_node, "fio");
    assert_eq!(phase, "Succeeded", "fio on {fio_node}: {log}");
    assert!(
        log.contains("verify") && log.contains("err= 0"),
        "fio did not verify: {log}"
    );
    eprintln!(
        "raw block claim: fio wrote and verified 16 MiB through the device in {:?}",
        started.elapsed()
    );

    // A VolumeSnapshot of `data`, a claim restored from it and a clone of `data`: each
    // holds the writer's bytes.
    world.apply_with(&path, SNAPSHOT_AND_CLONE);
    let started = Instant::now();
    for (pod, claim) in [("from-snapshot", "restored"), ("from-clone", "cloned")] {
        world.apply_with(
            &path,
            &claim_pod(
                pod,
                claim,
                &format!("nodeName: {}", nodes[0]),
                "test \"$(cat /data/note)\" = kept-across-hosts",
            ),
        );
        let phase = finished(&pods, pod).await;
        assert_eq!(
            phase,
            "Succeeded",
            "{pod}: {}",
            pod_log(&world, &nodes[0], pod)
        );
    }
    eprintln!(
        "snapshot → restored claim and clone read the writer's bytes in {:?}",
        started.elapsed()
    );

    // Online expansion (xfs): a pod writes and prints its filesystem's size while the claim
    // grows from 320Mi to 640Mi; df inside the pod sees the new size, the pod never stops.
    world.apply_with(&path, GROWING);
    world.apply_with(
        &path,
        &claim_pod(
            "grower",
            "grow",
            &format!("nodeName: {}", nodes[0]),
            "while true; do dd if=/dev/zero of=/data/f bs=64k count=16 conv=fsync 2>/dev/null \
             || exit 1; df -k /data | awk 'NR==2 {print \"size\", $2}'; \
             test -f /data/stop && exit 0; sleep 0.5; done",
        ),
    );
    let size_seen = |at_least: u64| {
        let log = pod_log(&world, &nodes[0], "grower");
        log.lines()
            // CRI log lines: `<time> stdout F size <KiB>`.
            .filter_map(|l| l.split_once(" size ").map(|(_, v)| v))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .any(|kib| kib >= at_least)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !size_seen(200_000) {
        assert!(
            Instant::now() < deadline,
            "the grower never wrote: {:?}\nlog: {}",
            pods.get("grower").await.ok().and_then(|p| p.status),
            pod_log(&world, &nodes[0], "grower")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    world.kubectl_with(
        &path,
        &[
            "patch",
            "pvc",
            "grow",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"640Mi"}}}}"#,
        ],
    );
    wait_for(
        "df in the pod shows the grown size",
        Duration::from_secs(90),
        || async { size_seen(500_000).then_some(()) },
    )
    .await;
    eprintln!(
        "claim grown online under a writing pod: df shows it {:?} after the patch",
        started.elapsed()
    );
    let grower = pods.get("grower").await.expect("grower");
    assert_eq!(
        grower.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "the writer stopped: {}",
        pod_log(&world, &nodes[0], "grower")
    );

    // Deleting the pods, the claims and the snapshot deletes the supervisor's claims, its
    // snapshot and the volumes, in the order their dependencies allow (as a user would): the
    // clones and restored claims, then the snapshot, then its source.
    for pod in ["reader", "fio", "from-snapshot", "from-clone", "grower"] {
        pods.delete(pod, &DeleteParams::default())
            .await
            .expect("delete pod");
    }
    let supervisor_claims_left = |at_most: usize| {
        let supervisor_claims = supervisor_claims.clone();
        async move {
            let left = supervisor_claims.list(&ListParams::default()).await.ok()?;
            (left.items.len() <= at_most).then_some(())
        }
    };
    for claim in ["raw", "restored", "cloned", "grow"] {
        claims
            .delete(claim, &DeleteParams::default())
            .await
            .expect("delete claim");
    }
    wait_for(
        "the supervisor's claims of the clones gone",
        Duration::from_secs(120),
        || supervisor_claims_left(1),
    )
    .await;
    world.kubectl_with(
        &path,
        &[
            "delete",
            "volumesnapshot",
            "data-snap",
            "--wait=true",
            "--timeout=120s",
        ],
    );
    claims
        .delete("data", &DeleteParams::default())
        .await
        .expect("delete claim");
    wait_for(
        "the supervisor's claim gone",
        Duration::from_secs(120),
        || supervisor_claims_left(0),
    )
    .await;

    world.delete_workload_cluster(&client).await;
}
