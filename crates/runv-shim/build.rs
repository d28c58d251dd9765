//! Generates containerd's cgroup v2 metrics message in pure Rust, so that
//! no system `protoc` is needed.

fn main() {
    let proto = "protos/cgroups_v2.proto";
    println!("cargo:rerun-if-changed={proto}");
    protobuf_codegen::Codegen::new()
        .pure()
        .include("protos")
        .input(proto)
        .cargo_out_dir("protos")
        .run_from_script();
}
