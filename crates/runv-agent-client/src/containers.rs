//! Typed calls for the container and process RPCs of protocol 3 (see
//! agent.proto for their contract). Processes are named by container ID
//! and exec ID, the init process having the empty exec ID.

use runv_protocol::agent;
use ttrpc::context;

use crate::{AgentClient, AgentError};

impl AgentClient {
    /// Creates a container from an OCI spec with guest paths; its init
    /// process waits for StartProcess and for its `stdio` streams.
    pub async fn create_container(
        &self,
        container_id: &str,
        oci_spec_json: Vec<u8>,
        stdio: agent::Stdio,
    ) -> Result<(), AgentError> {
        let request = agent::CreateContainerRequest {
            container_id: container_id.to_owned(),
            oci_spec_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        call(
            "CreateContainer",
            self.client
                .create_container(self.call_context(), &request)
                .await,
        )
    }

    /// Adds a process (an OCI process as JSON) to a running container.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        oci_process_json: Vec<u8>,
        stdio: agent::Stdio,
    ) -> Result<(), AgentError> {
        let request = agent::ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            oci_process_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        call(
            "ExecProcess",
            self.client
                .exec_process(self.call_context(), &request)
                .await,
        )
    }

    pub async fn start_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<agent::StartProcessResponse, AgentError> {
        let request = process_request(container_id, exec_id);
        call(
            "StartProcess",
            self.client
                .start_process(self.call_context(), &request)
                .await,
        )
    }

    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let request = agent::SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        call(
            "SignalProcess",
            self.client
                .signal_process(self.call_context(), &request)
                .await,
        )
    }

    /// Waits, without a deadline, until the process has exited and its
    /// output is all sent.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<agent::WaitProcessResponse, AgentError> {
        let request = process_request(container_id, exec_id);
        // A process may run for as long as it likes: no timeout.
        let response = self
            .client
            .wait_process(context::with_timeout(0), &request)
            .await;
        call("WaitProcess", response)
    }

    pub async fn resize_tty(
        &self,
        container_id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), AgentError> {
        let request = agent::ResizeTtyRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            width,
            height,
            ..Default::default()
        };
        call(
            "ResizeTty",
            self.client.resize_tty(self.call_context(), &request).await,
        )
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let request = process_request(container_id, exec_id);
        call(
            "CloseStdin",
            self.client.close_stdin(self.call_context(), &request).await,
        )
    }

    pub async fn delete_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(), AgentError> {
        let request = process_request(container_id, exec_id);
        call(
            "DeleteProcess",
            self.client
                .delete_process(self.call_context(), &request)
                .await,
        )
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentError> {
        let request = container_request(container_id);
        call(
            "ListProcesses",
            self.client
                .list_processes(self.call_context(), &request)
                .await,
        )
        .map(|response: agent::ListProcessesResponse| response.pids)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let request = container_request(container_id);
        call(
            "PauseContainer",
            self.client
                .pause_container(self.call_context(), &request)
                .await,
        )
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let request = container_request(container_id);
        call(
            "ResumeContainer",
            self.client
                .resume_container(self.call_context(), &request)
                .await,
        )
    }

    /// Applies new limits, OCI LinuxResources as JSON.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentError> {
        let request = agent::UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources_json,
            ..Default::default()
        };
        call(
            "UpdateContainer",
            self.client
                .update_container(self.call_context(), &request)
                .await,
        )
    }

    pub async fn container_stats(
        &self,
        container_id: &str,
    ) -> Result<agent::ContainerStats, AgentError> {
        let request = container_request(container_id);
        call(
            "ContainerStats",
            self.client
                .container_stats(self.call_context(), &request)
                .await,
        )
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let request = container_request(container_id);
        call(
            "RemoveContainer",
            self.client
                .remove_container(self.call_context(), &request)
                .await,
        )
    }
}

fn process_request(container_id: &str, exec_id: &str) -> agent::ProcessRequest {
    agent::ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    }
}

fn container_request(container_id: &str) -> agent::ContainerRequest {
    agent::ContainerRequest {
        container_id: container_id.to_owned(),
        ..Default::default()
    }
}

/// The reply of `method`, an `Empty` reply as `()`.
fn call<T: FromReply>(
    method: &'static str,
    reply: ttrpc::Result<T::Reply>,
) -> Result<T, AgentError> {
    reply
        .map(T::from_reply)
        .map_err(|source| AgentError::Call { method, source })
}

/// What a typed call returns for an RPC's reply.
trait FromReply {
    type Reply;
    fn from_reply(reply: Self::Reply) -> Self;
}

impl FromReply for () {
    type Reply = agent::Empty;
    fn from_reply(_: agent::Empty) {}
}

macro_rules! replies_as_is {
    ($($reply:ty),*) => {
        $(impl FromReply for $reply {
            type Reply = $reply;
            fn from_reply(reply: $reply) -> $reply {
                reply
            }
        })*
    };
}

replies_as_is!(
    agent::StartProcessResponse,
    agent::WaitProcessResponse,
    agent::ListProcessesResponse,
    agent::ContainerStats
);
