//! A minimal HTTP/1.1 client for the commands that use the engine's HTTP API: one
//! request per connection, a bounded answer.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The default address of the engine's HTTP API.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7071";

/// Largest answer read (a listing of every replayed mark of a large dead-letter topic
/// fits).
const MAX_ANSWER: u64 = 256 << 20;

/// Sends `method path` with a JSON `body` to `addr`; returns the status and the body.
pub async fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the engine's HTTP API at {addr}: {e}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    (&mut stream).take(MAX_ANSWER).read_to_end(&mut answer).await?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{addr} did not answer with HTTP"))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{addr} did not answer with an HTTP status"))?;
    let mut body = answer[split + 4..].to_vec();
    if head.lines().any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked") {
        body = dechunk(&body).ok_or_else(|| anyhow::anyhow!("{addr} sent a malformed chunked body"))?;
    }
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if n == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..n)?);
        rest = rest.get(n..)?.strip_prefix(b"\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunked_bodies_are_joined_and_malformed_ones_refused() {
        assert_eq!(super::dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
        assert!(super::dechunk(b"9\r\nabc").is_none());
        assert!(super::dechunk(b"zz\r\n").is_none());
    }
}
