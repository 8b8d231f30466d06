//! Clients are served on shards: threads with a single-threaded runtime
//! each, all accepting from the one listening socket. A client's session,
//! its task after a rest and the server connections it opens stay on the
//! thread that accepted it, and no thread wakes another to share out a
//! burst of ready sockets, as a work-stealing runtime does (its workers
//! woke each other about once per transaction: 1.4 context switches per
//! transaction against PgBouncer's 0.5). The control plane (health checks,
//! HTTP, backups) stays on the runtime that started pgheal.

use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::frontend::App;

/// The running shards; dropping it lets their threads end.
pub(super) struct Shards {
    /// Ends their runtimes (and what still runs on them).
    release: CancellationToken,
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.release.cancel();
    }
}

/// Starts `count` shards accepting from `listener` until `stop` (or a
/// shutdown); `accepting` is dropped by each when its accept loop ends.
pub(super) fn start(
    app: &Arc<App>,
    listener: &std::net::TcpListener,
    count: usize,
    stop: &CancellationToken,
    accepting: &mpsc::Sender<()>,
) -> io::Result<Shards> {
    let shards = Shards {
        release: CancellationToken::new(),
    };
    for i in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = listener.try_clone()?;
        let (app, accepting) = (app.clone(), accepting.clone());
        let (stop, release) = (stop.clone(), shards.release.clone());
        std::thread::Builder::new()
            .name(format!("pgheal-shard-{i}"))
            .spawn(move || {
                crate::net::set_shard(i as u16);
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => super::accept_loop(listener, app, stop).await,
                        Err(e) => tracing::error!(error = %e, "a shard cannot accept"),
                    }
                    drop(accepting);
                    // Its clients finish (a shutdown drains them) before the
                    // runtime goes.
                    release.cancelled().await;
                });
            })?;
    }
    Ok(shards)
}

/// Shards by default: one per core.
pub(super) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
