//! The source's own small tokio runtime, so the (synchronous) loader can wait on object-store
//! futures from any thread — including threads that belong to another runtime.

use std::future::Future;
use std::sync::OnceLock;

use crate::{Result, SourceError};

fn runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-source")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| SourceError::Store { what: "object-store runtime".into(), detail: e.clone() })
}

/// Run `fut` to completion on the source runtime and wait for it on this thread.
pub fn block_on<F, T>(fut: F) -> Result<T>
where
    F: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime()?.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| SourceError::Store { what: "object-store task".into(), detail: "it stopped early".into() })?
}
