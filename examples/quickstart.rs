//! Quickstart: two demo HTTP backends plus the gateway on the bundled configuration.
//!
//! ```sh
//! cargo run --release --example quickstart
//! curl -i http://127.0.0.1:9080/demo/anything     # alternates between demo-1 and demo-2
//! curl -i http://127.0.0.1:9080/hello
//! curl -s http://127.0.0.1:9090/v1/healthcheck    # what the health checker sees
//! ```
//!
//! Edit conf/apisix.yaml while it runs: changes apply within a second; a broken file is
//! rejected with its YAML path and the running configuration keeps serving.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

async fn demo_backend(addr: SocketAddr, name: &'static str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let text = format!("hello from {name}: {} {}\n", req.method(), req.uri());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        demo_backend("127.0.0.1:18001".parse()?, "demo-1").await?;
        demo_backend("127.0.0.1:18002".parse()?, "demo-2").await?;
        anyhow::Ok(())
    })?;
    let config = strait::Config::load(Path::new("conf/config.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let running = strait::Running::start(config, strait::Options::default())?;
    println!("strait is serving on {:?}; try: curl http://127.0.0.1:9080/demo/x", running.addrs.http);
    rt.block_on(tokio::signal::ctrl_c())?;
    running.shutdown();
    Ok(())
}
