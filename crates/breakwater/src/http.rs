//! The operator's HTTP listener (`[metrics] listen`): `/metrics` for Prometheus, `/healthz` and
//! `/readyz` for probes, 404 for anything else.
//!
//! Ours rather than the exporter's own listener: that one answers every path with the metrics,
//! so a probe of `/healthz` said 200 with the database down, and it has no place for a readiness
//! answer. Probes and scrapes are a handful of tiny GET requests a second, so this is HTTP/1.1
//! with one request per connection (`Connection: close`): a bounded read of the request head,
//! one write, close. It never reads a body and never keeps a connection.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::health::{Health, Verdict};
use crate::operator::Daemon;

/// A request head longer than this is refused: probes and scrapers send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

/// What the listener serves from.
pub struct Endpoints {
    pub daemon: Arc<Daemon>,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a request head (`GET /path?query HTTP/1.1`, headers ignored). HEAD is GET without
/// the body.
fn route(head: &[u8]) -> (Route, bool) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return (Route::BadRequest, false);
    };
    if !version.starts_with("HTTP/1.") {
        return (Route::BadRequest, false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (Route::MethodNotAllowed, false);
    }
    let path = target.split('?').next().unwrap_or_default();
    let r = match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        "/readyz" => Route::Readyz,
        _ => Route::NotFound,
    };
    (r, head_only)
}

/// Accepts until the task is aborted at exit. It runs through shutdown on purpose: `/readyz`
/// must keep answering "not ready" while clients drain.
pub async fn serve(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let endpoints = endpoints.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = answer(stream, &endpoints).await {
                        tracing::debug!(error = %e, "HTTP request ended early");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                upstream::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the request head (bounded in size and time), answers, closes.
async fn answer(mut stream: TcpStream, endpoints: &Endpoints) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = upstream::timer::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(chunk.get(..n).unwrap_or_default());
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(true);
            }
        }
    })
    .await;
    let complete = match read {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    if !complete {
        return Ok(());
    }
    let (route, head_only) = if head.len() > MAX_HEAD {
        (Route::BadRequest, false)
    } else {
        route(&head)
    };
    let (status, content_type, body) = match route {
        Route::Metrics => {
            let mut text = endpoints.metrics.render();
            crate::scrape::render(&mut text, &endpoints.daemon.proxy);
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text)
        }
        Route::Healthz => verdict(endpoints.health.liveness()),
        Route::Readyz => verdict(endpoints.health.readiness_of(&endpoints.daemon.proxy)),
        Route::NotFound => (
            "404 Not Found",
            TEXT,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
        Route::MethodNotAllowed => ("405 Method Not Allowed", TEXT, "use GET\n".into()),
        Route::BadRequest => ("400 Bad Request", TEXT, "bad request\n".into()),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    upstream::timer::timeout(READ_TIMEOUT, stream.write_all(&out))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = stream.shutdown().await;
    Ok(())
}

const TEXT: &str = "text/plain; charset=utf-8";

fn verdict(v: Verdict) -> (&'static str, &'static str, String) {
    match v {
        Verdict::Ok(why) => ("200 OK", TEXT, format!("{why}\n")),
        Verdict::Not(why) => ("503 Service Unavailable", TEXT, format!("{why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_route_by_method_and_path() {
        for (head, want) in [
            (
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..],
                (Route::Metrics, false),
            ),
            (b"GET /healthz HTTP/1.0\r\n\r\n", (Route::Healthz, false)),
            (b"HEAD /readyz HTTP/1.1\r\n\r\n", (Route::Readyz, true)),
            (
                b"GET /readyz?verbose=1 HTTP/1.1\r\n\r\n",
                (Route::Readyz, false),
            ),
            (b"GET / HTTP/1.1\r\n\r\n", (Route::NotFound, false)),
            (b"GET /health HTTP/1.1\r\n\r\n", (Route::NotFound, false)),
            (
                b"POST /metrics HTTP/1.1\r\n\r\n",
                (Route::MethodNotAllowed, false),
            ),
            (b"GET /metrics\r\n\r\n", (Route::BadRequest, false)),
            (b"\x16\x03\x01garbage", (Route::BadRequest, false)),
        ] {
            assert_eq!(route(head), want, "{}", String::from_utf8_lossy(head));
        }
    }
}
