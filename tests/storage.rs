//! Storage through a real containerd: a root file system on an ext4 loop
//! device handed to the Task API as a snapshotter of block devices would,
//! block and image volumes hot-plugged into the running pod VM as
//! virtio-blk, bind volumes shared with virtio-fs, read-only honoured,
//! data on the host after the pod is gone, and nothing left holding a disk;
//! raw block devices (`ctr run --device`) and the refusal of host character
//! devices.

use std::{fs, os::unix::fs::PermissionsExt};

use runv_tests::{
    busybox::build_busybox_rootfs,
    containerd::Containerd,
    disks::{self, ext4_image, processes_holding, raw_image, read_at, read_ext4_file, LoopDevice},
};

fn started() -> Option<Containerd> {
    if let Some(why) = disks::unavailable() {
        println!("SKIPPED: {why}");
        return None;
    }
    let containerd = Containerd::start()?;
    containerd.import_busybox();
    Some(containerd)
}

/// containerd's Tasks.Create with `ext4` on a loop device as the rootfs
/// mount: the shim plugs the device into the VM, the agent mounts it, the
/// container runs from it and writes to it.
#[test]
fn block_rootfs_through_the_task_api() {
    let Some(containerd) = started() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let tree = scratch.path().join("tree");
    build_busybox_rootfs(&tree);
    fs::write(tree.join("etc/origin"), "from the ext4 image\n").unwrap();
    // The command lives on the disk (ctr's `container create` would take
    // a `-c` argument for its own).
    let check = tree.join("check");
    fs::write(
        &check,
        "#!/bin/sh\ncat /etc/origin; grep ' / ' /proc/mounts; echo written-in-guest > /proof\n",
    )
    .unwrap();
    fs::set_permissions(&check, fs::Permissions::from_mode(0o755)).unwrap();
    let image = scratch.path().join("rootfs.img");
    ext4_image(&image, 64, Some(&tree));
    let disk = LoopDevice::attach(&image);

    let id = "block-rootfs";
    containerd.ctr_ok(&[
        "container",
        "create",
        "--runtime",
        "io.containerd.runv.v2",
        runv_tests::containerd::BUSYBOX_IMAGE,
        id,
        "/check",
    ]);
    let output = scratch.path().join("output.log");
    containerd.create_task_with_rootfs(id, &[("ext4", disk.path_str(), &["rw"])], &output);
    containerd.start_task(id);
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);

    let out = fs::read_to_string(&output).unwrap();
    println!("container output:\n{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("from the ext4 image"));
    let root = lines.next().unwrap_or_default();
    assert!(
        root.starts_with("/dev/vd") && root.contains(" / ext4 rw"),
        "the root is the plugged disk: {root}"
    );
    assert_eq!(processes_holding(disk.path()), Vec::<String>::new());
    assert_eq!(
        read_ext4_file(disk.path(), "/proof").as_deref(),
        Some("written-in-guest\n")
    );
    containerd.assert_nothing_running();
    containerd.stop();
}

/// `ctr run --mount`: an ext4 loop device and an image file (`loop`) go in
/// as disks, two host directories as shares; read-only holds for the
/// image and the directory that ask for it; what the container wrote is on
/// the host after it is gone; blkio counts the disk's writes.
#[test]
fn block_and_bind_volumes() {
    let Some(containerd) = started() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let contents = scratch.path().join("contents");
    fs::create_dir(&contents).unwrap();
    fs::write(contents.join("hello"), "on the volume\n").unwrap();
    let volume_image = scratch.path().join("volume.img");
    ext4_image(&volume_image, 32, Some(&contents));
    let volume = LoopDevice::attach(&volume_image);
    let loop_image = scratch.path().join("image.img");
    ext4_image(&loop_image, 32, Some(&contents));
    let (rw_dir, ro_dir) = (scratch.path().join("rw"), scratch.path().join("ro"));
    fs::create_dir(&rw_dir).unwrap();
    fs::create_dir(&ro_dir).unwrap();
    fs::write(ro_dir.join("given"), "from the host\n").unwrap();

    let mounts = [
        format!("type=ext4,src={},dst=/data,options=rw", volume.path_str()),
        format!(
            "type=ext4,src={},dst=/image,options=loop:ro",
            loop_image.display()
        ),
        format!(
            "type=bind,src={},dst=/rw,options=rbind:rw",
            rw_dir.display()
        ),
        format!(
            "type=bind,src={},dst=/ro,options=rbind:ro",
            ro_dir.display()
        ),
    ];
    let mut options = Vec::new();
    for mount in &mounts {
        options.extend(["--mount", mount.as_str()]);
    }
    let id = "volumes";
    containerd.ctr_ok(&containerd.runv_run_args("-d", &options, id, &["sleep", "600"]));
    let script = "cat /data/hello /image/hello /ro/given; \
        echo from-guest > /data/out; dd if=/dev/zero of=/data/zeros bs=64k count=16 conv=fsync 2>/dev/null; \
        (echo x > /image/x) 2>/dev/null && echo image-writable || echo image-read-only; \
        (echo x > /ro/x) 2>/dev/null && echo ro-writable || echo ro-read-only; \
        echo kept > /rw/kept; sync";
    let out = containerd.ctr_ok(&["task", "exec", "--exec-id", "e1", id, "sh", "-c", script]);
    assert_eq!(
        out,
        "on the volume\non the volume\nfrom the host\nimage-read-only\nro-read-only\n"
    );
    let metrics = containerd.ctr_ok(&["task", "metrics", "--format", "json", id]);
    let written = blkio_written(&metrics);
    println!("blkio bytes written per device: {written:?}");
    assert!(
        written.iter().any(|(_, bytes)| *bytes >= 1 << 20),
        "the 1 MiB written to /data shows in blkio: {metrics}"
    );
    assert!(
        !processes_holding(volume.path()).is_empty(),
        "the hypervisor holds the plugged disk"
    );
    containerd.ctr_ok(&["task", "kill", "--signal", "SIGKILL", id]);
    containerd.wait_stopped(id);
    containerd.ctr_ok(&["task", "delete", id]);
    containerd.ctr_ok(&["container", "delete", id]);

    for disk in [volume.path(), loop_image.as_path()] {
        let holders = processes_holding(disk);
        assert!(holders.is_empty(), "{} held by {holders:?}", disk.display());
    }
    assert_eq!(
        read_ext4_file(volume.path(), "/out").as_deref(),
        Some("from-guest\n")
    );
    assert_eq!(read_ext4_file(&loop_image, "/x"), None);
    assert_eq!(fs::read_to_string(rw_dir.join("kept")).unwrap(), "kept\n");
    assert!(!ro_dir.join("x").exists());
    containerd.assert_nothing_running();
    containerd.stop();
}

/// `ctr run --device` of a host loop device: the container gets the
/// plugged disk at the host device's path, under the guest's numbers,
/// reads the host's bytes and writes its own, which the host finds once
/// the container is gone and nothing holds the device.
#[test]
fn raw_block_device() {
    let Some(containerd) = started() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let image = scratch.path().join("raw.img");
    raw_image(&image, 8, b"raw bytes from the host");
    let device = LoopDevice::attach(&image);
    let path = device.path_str();
    let script = format!(
        "head -c 23 {path}; echo; \
         printf 'written by the container' | dd of={path} bs=512 seek=1 conv=notrunc 2>/dev/null; \
         sync; set -- $(ls -l {path} | tr -d ,); grep DEVNAME /sys/dev/block/$5:$6/uevent"
    );
    let id = "raw-device";
    let out = containerd.ctr_ok(&containerd.runv_run_args(
        "--rm",
        &["--device", path],
        id,
        &["sh", "-c", &script],
    ));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("raw bytes from the host"));
    let named = lines.next().unwrap_or_default();
    assert!(
        named.starts_with("DEVNAME=vd"),
        "the node has the numbers of the guest's virtio-blk disk: {named}"
    );
    let holders = processes_holding(device.path());
    assert!(holders.is_empty(), "{path} held by {holders:?}");
    assert_eq!(read_at(&image, 512, 24), b"written by the container");
    containerd.assert_nothing_running();
    containerd.stop();
}

/// A host character device other than the standard ones cannot be given
/// to a container in a VM: ctr says which and why.
#[test]
fn host_character_devices_are_refused() {
    let Some(containerd) = started() else { return };
    let args = containerd.runv_run_args(
        "--rm",
        &["--device", "/dev/loop-control"],
        "char-device",
        &["true"],
    );
    let output = containerd.ctr(&args);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("a VM sandbox cannot pass host character device /dev/loop-control (10:237)")
            && stderr.contains("use runc for it"),
        "{stderr}"
    );
    containerd.assert_nothing_running();
    containerd.stop();
}

/// (device, bytes written) from `ctr task metrics --format json`'s v1
/// blkio, or v2 io on unified hosts.
fn blkio_written(metrics_json: &str) -> Vec<(String, u64)> {
    let metrics: serde_json::Value = serde_json::from_str(metrics_json).unwrap();
    let number = |v: &serde_json::Value, key: &str| v.get(key).and_then(|n| n.as_u64());
    if let Some(entries) = metrics
        .pointer("/blkio/io_service_bytes_recursive")
        .and_then(|e| e.as_array())
    {
        return entries
            .iter()
            .filter(|e| e.get("op").and_then(|op| op.as_str()) == Some("Write"))
            .map(|e| {
                let device = e.get("device").and_then(|d| d.as_str()).unwrap_or("?");
                (device.to_owned(), number(e, "value").unwrap_or(0))
            })
            .collect();
    }
    metrics
        .pointer("/io/usage")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
        .map(|e| {
            let device = format!(
                "{}:{}",
                number(e, "major").unwrap_or(0),
                number(e, "minor").unwrap_or(0)
            );
            (device, number(e, "wbytes").unwrap_or(0))
        })
        .collect()
}
