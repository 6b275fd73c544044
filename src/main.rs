//! The `strait` command: `run` the gateway or `validate` a configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use strait::{Config, Options, Running};

/// mimalloc instead of glibc's malloc: glibc trims per-thread arenas with madvise/mprotect,
/// and on a VM each of those TLB shootdowns is an inter-processor interrupt on the hot path.
/// (Not with the `system-alloc` feature, which is for heap profilers.)
///
/// mimalloc 2 (the crate's `v2` feature), not 3: mimalloc 3 spaces the blocks of the sizes our
/// connection tasks have further apart (100,000 blocks of 768 bytes at 128-byte alignment, as
/// tokio aligns tasks: 896 bytes apart against 768; of 1,280 bytes: 1,536 against 1,280).
/// Resident memory per idle connection (`scripts/conn-memory.py`, one sitting): plain 1,055 ->
/// 839 B, h2c 2,307 -> 1,678 B, L4 session 2,113 -> 1,986 B, for about 2 MiB more at start; the
/// harness's rates did not move (BENCHMARKS.md, "Memory").
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
strait - an L4/L7 proxy and service-discovery bridge (APISIX-compatible configuration)

USAGE:
    strait run [-c conf/config.yaml] [--workers N] [--drain-timeout SECS]
    strait validate [-c conf/config.yaml]
    strait --help | --version

The resources (routes, upstreams, ...) are read from apisix.yaml beside config.yaml
and re-read when the file changes.

OPTIONS:
    -c, --config PATH        node configuration (default: conf/config.yaml)
    -w, --workers N          worker threads (default: nginx_config.worker_processes,
                             else the number of cores)
        --drain-timeout S    on SIGTERM, wait up to S seconds for in-flight requests
                             (default: nginx_config.worker_shutdown_timeout, else 30)
    -h, --help               this text
    -V, --version            the version

Logging: RUST_LOG (default: info), e.g. RUST_LOG=strait=debug.";

/// A gateway holds two descriptors per proxied connection: lift the soft limit to the hard one
/// (what nginx's `worker_rlimit_nofile` is usually set for).
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            eprintln!("strait: cannot raise the open-file limit: {e}");
        }
    }
}

struct Args {
    command: String,
    config: PathBuf,
    workers: Option<usize>,
    drain: Option<Duration>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        command: String::new(),
        config: PathBuf::from("conf/config.yaml"),
        workers: None,
        drain: None,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" | "help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "-V" | "--version" | "version" => {
                println!("strait {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "-c" | "--config" => args.config = it.next().ok_or("-c needs a path")?.into(),
            "-w" | "--workers" => {
                let v = it.next().ok_or("--workers needs a number")?;
                let n: usize = v.parse().map_err(|_| format!("--workers: not a number: {v}"))?;
                if n == 0 || n > 1024 {
                    return Err("--workers must be 1..1024".into());
                }
                args.workers = Some(n);
            }
            "--drain-timeout" => {
                let v = it.next().ok_or("--drain-timeout needs seconds")?;
                let s: f64 = v.parse().map_err(|_| format!("--drain-timeout: not a number: {v}"))?;
                if !(s.is_finite() && s >= 0.0) {
                    return Err("--drain-timeout must be >= 0".into());
                }
                args.drain = Some(strait::config::seconds(s));
            }
            "run" | "validate" if args.command.is_empty() => args.command = a,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if args.command.is_empty() {
        return Err("missing command: run or validate".into());
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    raise_fd_limit();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if !config.node.ignored.is_empty() {
        // Not an error: APISIX settings Strait accepts without applying them
        // (docs/configuration.md, "APISIX settings accepted and not applied").
        let list = config.node.ignored.join(", ");
        if args.command == "validate" {
            eprintln!("{}: note: accepted, not applied: {list}", config.config_path.display());
        } else {
            tracing::warn!(file = %config.config_path.display(), "accepted, not applied: {list}");
        }
    }
    if args.command == "validate" {
        println!(
            "{}: ok; {}: ok ({} routes, {} upstreams, {} stream routes, {} ssls)",
            config.config_path.display(),
            config.resources_path.display(),
            config.resources.routes.len(),
            config.resources.upstreams.len(),
            config.resources.stream_routes.len(),
            config.resources.ssls.len(),
        );
        return ExitCode::SUCCESS;
    }

    let mut opts = Options::default();
    if let Some(d) = args.drain.or(config.node.drain_timeout) {
        opts.drain_timeout = d;
    }
    if let Some(w) = args.workers.or(config.node.workers) {
        opts.workers = w;
    }
    let running = match Running::start(config, opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strait: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match signals {
        Ok(rt) => rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }),
        Err(e) => {
            eprintln!("strait: cannot wait for signals: {e}");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!("shutting down: draining connections");
    running.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
