//! A container cannot reach the agent (issue 12, docs/security.md):
//! AF_VSOCK is not namespaced, so a process in a container, as root with
//! the default capabilities and as uid 1000, tries the agent's ttrpc port
//! (1024), stdio port (1026) and port-forward port (1027) at CID 1
//! (loopback), CID 2 (the host) and the guest's own CID, and sends a
//! ttrpc request on any connection it gets. Every connect must fail, and
//! no request be answered.

use runv_tests::containerd::{build_busybox_image_with_files, Containerd};

const IMAGE: &str = "docker.io/runv/vsock-probe:test";

/// The agent's ports the probe tries, at each of its 3 CIDs.
const ATTEMPTS_PER_RUN: usize = 9;

#[test]
fn containers_cannot_reach_the_agent_over_vsock() {
    let Some(containerd) = Containerd::start() else {
        return;
    };
    let probe = containerd.dir().join("vsock-probe");
    if !runv_tests::build_attack_program("vsock_probe", &probe) {
        return;
    }
    let archive = build_busybox_image_with_files(
        containerd.dir(),
        IMAGE,
        &[],
        &["sh"],
        std::slice::from_ref(&probe),
    );
    containerd.import_image(&archive);

    // As root with ctr's default capabilities, then as uid 1000.
    let probe = probe.to_str().unwrap();
    let script = format!("{probe}; {probe} 1000");
    let output = containerd.ctr_ok(&containerd.runv_run_image_args(
        "--rm",
        &[],
        IMAGE,
        "vsock-probe",
        &["sh", "-c", &script],
    ));
    println!("what the probe got:\n{output}");

    for uid in [0, 1000] {
        assert!(
            output.contains(&format!("probing as uid {uid}\n")),
            "the probe did not run as uid {uid}"
        );
    }
    let attempts: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("attempt "))
        .collect();
    assert_eq!(
        attempts.len(),
        2 * ATTEMPTS_PER_RUN,
        "every attempt reported"
    );
    assert_eq!(output.matches("\ndone\n").count(), 2, "both runs finished");
    let reached: Vec<&&str> = attempts
        .iter()
        .filter(|line| !line.contains(": failed: "))
        .collect();
    assert!(
        reached.is_empty(),
        "a container connected to the agent's ports: {reached:#?}"
    );
    assert!(!output.contains("ANSWERED"), "an RPC reached the agent");
    containerd.stop();
}
