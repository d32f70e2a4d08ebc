//! Connection limit and idle timeout for the HTTP listener.

use std::sync::Arc;

use crate::metrics::IngestPath;
use crate::shared::Shared;

/// The HTTP listener: counts connections against `ingest.max_connections` (refusing
/// the excess, counted as `too_many_connections`) and closes connections idle for
/// longer than `ingest.idle_timeout_secs`, like the other listeners.
pub struct LimitedListener {
    inner: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl LimitedListener {
    /// Wraps a bound listener.
    pub fn new(inner: tokio::net::TcpListener, shared: Arc<Shared>) -> LimitedListener {
        LimitedListener { inner, shared }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.shared.connections.clone().try_acquire_owned() else {
                self.shared.ingest.metrics().rejected(IngestPath::Http, "too_many_connections", 1);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let idle = self.shared.idle_timeout();
            return (
                LimitedStream {
                    stream,
                    idle,
                    deadline: Box::pin(tokio::time::sleep(idle)),
                    _permit: permit,
                    _open: self.shared.ingest.metrics().connection_opened(IngestPath::Http),
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted HTTP connection holding its connection slot, with an idle deadline.
pub struct LimitedStream {
    stream: tokio::net::TcpStream,
    idle: std::time::Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _open: crate::metrics::ConnectionGuard,
}

impl LimitedStream {
    fn touch(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

impl tokio::io::AsyncRead for LimitedStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending => match std::future::Future::poll(self.deadline.as_mut(), cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        if r.is_ready() {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
