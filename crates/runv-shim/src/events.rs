//! Task events to containerd, through the publisher containerd-shim runs
//! (it queues and retries).

use containerd_shim::{event::Event, publisher::RemotePublisher};

/// Where the shim's events go: containerd, in the shim's namespace.
pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Events {
        Events {
            publisher,
            namespace,
        }
    }

    /// Queues `event` for containerd. A lost event is logged, not fatal:
    /// containerd also learns the state through the Task API.
    pub async fn publish<E: Event + 'static>(&self, event: E) {
        let topic = event.topic();
        let context = containerd_shim::protos::ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(context, &topic, &self.namespace, Box::new(event))
            .await
        {
            tracing::warn!(%topic, error = %e, "cannot publish event");
        }
    }
}
