//! containerd's CRI plugin for tests: its configuration (the runtime
//! handler `runv`, a local pause image, no host CNI config), the pause
//! image built from busybox (no registry is reachable), and a CRI v1
//! client over containerd's socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::build_busybox_based_image;

/// The containerd namespace the CRI plugin keeps its containers in.
pub const NAMESPACE: &str = "k8s.io";

/// The runtime handler that selects runv (a RuntimeClass's `handler`).
pub const RUNTIME_HANDLER: &str = "runv";

/// The sandbox ("pause") image, built locally.
pub const PAUSE_IMAGE: &str = "docker.io/runv/pause:test";

/// The CRI plugin's part of a containerd config (version 2) whose
/// directory is `root`: the handler `runv` with the runv config
/// `root/runv.toml` as ConfigPath, the local pause image, and CNI config
/// read from the empty `root/cni` rather than the host's /etc/cni (host
/// network pods need none). A `runtimes` table replaces containerd's
/// default one, so runc (the default handler) is declared too. The stream
/// server (exec, attach, port-forward
/// URLs) listens on a free port of the loopback.
pub fn plugin_config(root: &Path) -> String {
    let cri = r#"[plugins."io.containerd.grpc.v1.cri"]"#;
    let runtimes = r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes"#;
    format!(
        "{cri}\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  \
         stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  \
         enable_selinux = false\n\
         {cri_cni}\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{root}/cni\"\n\
         {runtimes}.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         {runtimes}.{RUNTIME_HANDLER}]\n  runtime_type = \"io.containerd.runv.v2\"\n\
         {runtimes}.{RUNTIME_HANDLER}.options]\n  ConfigPath = \"{root}/runv.toml\"\n",
        cri_cni = r#"[plugins."io.containerd.grpc.v1.cri".cni]"#,
        root = root.display(),
    )
}

/// Builds the pause image: busybox whose shell sleeps until SIGTERM or
/// SIGINT, as the real pause does.
pub fn build_pause_image(dir: &Path) -> PathBuf {
    build_busybox_based_image(
        dir,
        PAUSE_IMAGE,
        &[
            "/bin/sh",
            "-c",
            "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
        ],
        &[],
    )
}

/// CRI's runtime and image services on containerd's socket.
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

impl CriClient {
    pub async fn connect(socket: &Path) -> CriClient {
        let socket = socket.to_owned();
        // The URI is a placeholder: every connection goes to the socket.
        let channel = Endpoint::from_static("http://[::]:0")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .expect("connecting to containerd's CRI socket");
        CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }
}
