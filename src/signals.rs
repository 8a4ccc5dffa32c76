//! The daemons' shutdown signal, shared by `vsmserver`, `vsmagent` and the demo.
//!
//! Owns the handlers of SIGTERM and SIGINT. They are installed when [`shutdown_signal`] is
//! called, not when its future is first polled, so a signal that arrives in between is not
//! lost and does not kill the process the default way.
//! Never: ends the process itself; the caller runs its written shutdown order.

use std::future::Future;

/// Installs the handlers at once and resolves on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_sigterm_resolves_the_future() {
        let stop = super::shutdown_signal().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), stop).await.expect("resolved by SIGTERM");
    }
}
