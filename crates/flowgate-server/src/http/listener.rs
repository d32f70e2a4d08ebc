//! Connection limit, idle timeout and request deadline for the HTTP listener.

use std::sync::Arc;

use crate::metrics::IngestPath;
use crate::shared::Shared;

/// The HTTP listener: counts connections against `ingest.max_connections` (refusing
/// the excess, counted as `too_many_connections`), closes connections idle for longer
/// than `ingest.idle_timeout_secs`, like the other listeners, and closes a connection
/// whose request (headers and body) is still trickling in twice `ingest.frame_timeout_secs`
/// after its first byte (counted as `request_timeout`).
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

/// The address of the client of an HTTP request (axum's `ConnectInfo` for this listener).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, LimitedListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, LimitedListener>) -> Peer {
        Peer(*stream.remote_addr())
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
                    // A backstop for slow headers; the produce handler holds a body to
                    // `frame_timeout` itself and answers 408.
                    request_timeout: self.shared.frame_timeout().saturating_mul(2),
                    request_started: None,
                    metrics: self.shared.ingest.metrics().clone(),
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

/// An accepted HTTP connection holding its connection slot, with an idle deadline and a
/// deadline for each request to arrive.
pub struct LimitedStream {
    stream: tokio::net::TcpStream,
    idle: std::time::Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    request_timeout: std::time::Duration,
    /// When the first byte of the request being read arrived; cleared by a response.
    request_started: Option<std::time::Instant>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
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
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.touch();
                if r.is_ok() && buf.filled().len() > before {
                    // Bytes of a request: they must not keep coming past its deadline,
                    // however steadily they trickle (the idle timer alone would allow it).
                    let now = std::time::Instant::now();
                    let started = *self.request_started.get_or_insert(now);
                    if now.duration_since(started) > self.request_timeout {
                        self.metrics.rejected(IngestPath::Http, "request_timeout", 1);
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "request did not arrive whole within ingest.frame_timeout_secs",
                        )));
                    }
                }
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
            // A response is going out: the request it answers has arrived.
            self.request_started = None;
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
