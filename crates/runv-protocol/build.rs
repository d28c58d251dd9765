//! Generates the protobuf messages and ttrpc stubs in pure Rust, so that no
//! system `protoc` is needed.
use std::{fs, path::Path};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let protos = ["protos/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    Codegen::new()
        .out_dir(&out_dir)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent protocol from protos/agent.proto");
    for module in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&Path::new(&out_dir).join(module));
    }
}

/// `include!` rejects inner attributes and inner doc comments, which the
/// generator emits at the top of each file; lib.rs sets the lints instead.
fn strip_inner_attributes(path: &Path) {
    let source = fs::read_to_string(path).expect("reading generated code");
    let kept: Vec<&str> = source
        .lines()
        .filter(|line| !line.starts_with("#![") && !line.starts_with("//!"))
        .collect();
    fs::write(path, kept.join("\n")).expect("writing generated code");
}
