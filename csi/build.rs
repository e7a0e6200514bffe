//! Generates the CSI gRPC types and services from the spec's proto (`proto/csi.proto`, CSI v1.3.0
//! as shipped by the `k8s-csi` crate, whose generated code targets an old tonic).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    Ok(())
}
