//! Boots a pod VM confined to the scratch directory given as the first
//! argument (sharing the directory given as the second one, if any), prints
//! the VM's PIDs on one line, and holds the VM until killed. Tests kill it
//! to play a crashing shim.

use std::path::PathBuf;

use runv_agent_client::ConnectOptions;
use runv_sandbox::PodVm;

#[tokio::main]
async fn main() {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let scratch = args
        .next()
        .expect("usage: hold-vm SCRATCH_DIR [SHARED_DIR]");
    let config = runv_tests::test_config(&scratch);
    let mut spec = PodVm::spec(&config, "held", scratch.join("console.log"));
    spec.shared_dir = args.next();
    let connect = ConnectOptions::new(config.vm.agent_timeout());
    let vm = PodVm::boot(&config, spec, &connect)
        .await
        .expect("VM boots");
    let pids: Vec<String> = vm.pids().iter().map(u32::to_string).collect();
    println!("{}", pids.join(" "));
    std::future::pending::<()>().await;
}
