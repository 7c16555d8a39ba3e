//! `tern monitor`: one Prometheus endpoint for every tern sandbox on the host.
//!
//! The sandbox directory (`<root>/sbs`, see [`crate::metrics::sbs`]) is the source of truth
//! for which sandboxes exist (Kata's lesson, its issue #3550): an inotify watch adds a
//! sandbox when its directory appears and removes it when the directory goes — never because
//! CRI did not list it. A missing `sbs` directory is waited for. CRI (`ListPodSandbox`) is
//! asked only for pod metadata, added to every series as `cri_uid`, `cri_name`,
//! `cri_namespace` (retried until CRI knows the pod). A scrape asks every shim concurrently,
//! each within the scrape timeout, so a dead shim or stale socket costs one scrape failure,
//! not the response.
//!
//! Endpoints: `/metrics` (all sandboxes plus `tern_monitor_*`; `?filter_family=P[,P…]` keeps
//! families whose name starts with a `P`), `/sandboxes` (JSON), `/agent-url?sandbox=ID`.

pub mod sbs_watch;
pub mod text;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_sync::LockExt;

use vmm::AtomicHistogram;

use crate::cri::PodMeta;
use crate::metrics::exposition::{self, Family, Value};
use crate::metrics::http::{self, Handler, Request, Response, PROMETHEUS_TEXT};
use crate::metrics::sbs::MONITOR_SOCKET;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";
/// Default CRI socket (containerd's).
pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";
/// Default per-sandbox scrape timeout.
pub const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often sandboxes without CRI metadata are looked up again.
const CRI_RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Buckets (seconds) of the per-sandbox scrape duration histogram.
const SCRAPE_BUCKETS: [f64; 7] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0];

/// Errors running the monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot listen on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error("cannot start the sandbox directory watcher")]
    Watch(#[source] std::io::Error),
}

/// How the monitor is set up.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    pub listen: SocketAddr,
    /// The `sbs` directory (`<root_dir>/sbs`).
    pub sbs_root: PathBuf,
    /// CRI socket; `None` disables the CRI labels.
    pub cri_socket: Option<PathBuf>,
    pub scrape_timeout: Duration,
}

/// One known sandbox.
#[derive(Debug, Clone)]
pub struct SandboxEntry {
    pub id: String,
    pub socket: PathBuf,
    /// Pod metadata once CRI knew the sandbox.
    pub cri: Option<PodMeta>,
}

/// The set of sandboxes, shared by the directory watcher, the CRI labeler and the server.
#[derive(Debug, Default)]
pub struct Sandboxes {
    entries: Mutex<BTreeMap<String, SandboxEntry>>,
}

impl Sandboxes {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SandboxEntry>> {
        self.entries.lock_unpoisoned()
    }

    /// Make the set exactly `ids` (directories under `sbs_root`), keeping known metadata.
    pub fn reconcile(&self, sbs_root: &Path, ids: &[String]) {
        let mut entries = self.lock();
        entries.retain(|id, _| {
            let keep = ids.contains(id);
            if !keep {
                tracing::info!(sandbox = %id, "sandbox removed");
            }
            keep
        });
        for id in ids {
            entries.entry(id.clone()).or_insert_with(|| {
                tracing::info!(sandbox = %id, "sandbox added");
                SandboxEntry { id: id.clone(), socket: sbs_root.join(id).join(MONITOR_SOCKET), cri: None }
            });
        }
    }

    /// A copy of the current entries.
    pub fn list(&self) -> Vec<SandboxEntry> {
        self.lock().values().cloned().collect()
    }

    fn set_cri(&self, id: &str, meta: PodMeta) {
        if let Some(e) = self.lock().get_mut(id) {
            e.cri = Some(meta);
        }
    }
}

/// The monitor's own counters.
#[derive(Debug)]
struct MonitorStats {
    scrapes: AtomicU64,
    failures: AtomicU64,
    duration: AtomicHistogram,
}

/// The HTTP side of the monitor.
pub struct MonitorEndpoint {
    sandboxes: Arc<Sandboxes>,
    scrape_timeout: Duration,
    stats: MonitorStats,
}

impl MonitorEndpoint {
    pub fn new(sandboxes: Arc<Sandboxes>, scrape_timeout: Duration) -> Self {
        MonitorEndpoint {
            sandboxes,
            scrape_timeout,
            stats: MonitorStats {
                scrapes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                duration: AtomicHistogram::new(&SCRAPE_BUCKETS),
            },
        }
    }

    /// Scrape one shim: its text, or why not.
    async fn scrape(&self, entry: &SandboxEntry) -> Result<String, String> {
        let started = Instant::now();
        let result = match http::get_unix(&entry.socket, "/metrics", self.scrape_timeout).await {
            Ok((200, body)) => String::from_utf8(body).map_err(|_| "response is not UTF-8".to_owned()),
            Ok((status, _)) => Err(format!("HTTP {status}")),
            Err(e) => Err(crate::sandbox::error_chain(&e)),
        };
        self.stats.scrapes.fetch_add(1, Ordering::Relaxed);
        self.stats.duration.observe(started.elapsed());
        if let Err(e) = &result {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sandbox = %entry.id, error = %e, "scrape failed");
        }
        result
    }

    async fn metrics(&self, request: &Request) -> Response {
        let filters: Vec<String> = request
            .param("filter_family")
            .map(|f| f.split(',').filter(|p| !p.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let keep = |name: &str| filters.is_empty() || filters.iter().any(|p| name.starts_with(p.as_str()));
        let entries = self.sandboxes.list();
        let scrapes = futures_join_all(entries.iter().map(|e| self.scrape(e))).await;
        let mut merger = text::Merger::new();
        for (entry, result) in entries.iter().zip(scrapes) {
            let Ok(body) = result else { continue };
            let cri = entry.cri.clone().unwrap_or(PodMeta {
                uid: String::new(),
                name: String::new(),
                namespace: String::new(),
                ready: false,
            });
            let labels = text::label_prefix(&[
                ("sandbox_id", &entry.id),
                ("cri_uid", &cri.uid),
                ("cri_name", &cri.name),
                ("cri_namespace", &cri.namespace),
            ]);
            merger.add(&body, &labels, &keep);
        }
        let mut out = String::with_capacity(64 * 1024);
        merger.finish(&mut out);
        let own = exposition::encode(self.own_families(entries.len()));
        let mut own_merger = text::Merger::new();
        own_merger.add(&own, "", &keep);

        // The monitor's own series carry no sandbox labels.
        own_merger.finish(&mut out);
        Response::ok(PROMETHEUS_TEXT, out)
    }

    fn own_families(&self, running: usize) -> Vec<Family> {
        vec![
            Family::single(
                "tern_monitor_running_shims",
                "Sandboxes (shims) the monitor knows, from the sandbox directory.",
                Value::Gauge(running as f64),
            ),
            Family::single(
                "tern_monitor_scrapes",
                "Scrapes of shims.",
                Value::Counter(self.stats.scrapes.load(Ordering::Relaxed)),
            ),
            Family::single(
                "tern_monitor_scrape_failures",
                "Scrapes of shims that failed or timed out.",
                Value::Counter(self.stats.failures.load(Ordering::Relaxed)),
            ),
            Family::single(
                "tern_monitor_scrape_duration_seconds",
                "Time to scrape one shim.",
                Value::Histogram(self.stats.duration.snapshot()),
            ),
        ]
    }

    fn sandboxes_json(&self) -> Response {
        let list: Vec<serde_json::Value> = self
            .sandboxes
            .list()
            .into_iter()
            .map(|e| {
                let cri = e.cri.as_ref();
                serde_json::json!({
                    "sandbox_id": e.id,
                    "cri_uid": cri.map(|c| c.uid.clone()),
                    "cri_name": cri.map(|c| c.name.clone()),
                    "cri_namespace": cri.map(|c| c.namespace.clone()),
                })
            })
            .collect();
        Response::ok("application/json", serde_json::Value::Array(list).to_string())
    }

    async fn agent_url(&self, request: &Request) -> Response {
        let Some(id) = request.param("sandbox") else { return Response::error(400, "missing ?sandbox=ID") };
        let Some(entry) = self.sandboxes.list().into_iter().find(|e| e.id == id) else {
            return Response::error(404, "no such sandbox");
        };
        match http::get_unix(&entry.socket, "/agent-url", self.scrape_timeout).await {
            Ok((200, body)) => Response::ok("text/plain; charset=utf-8", body),
            Ok((status, _)) => Response::error(502, &format!("shim answered HTTP {status}")),
            Err(e) => Response::error(502, &crate::sandbox::error_chain(&e)),
        }
    }
}

/// Await all futures concurrently (a small `join_all` on tokio's `JoinSet`-free path).
async fn futures_join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[async_trait::async_trait]
impl Handler for MonitorEndpoint {
    async fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/metrics" => self.metrics(&request).await,
            "/sandboxes" => self.sandboxes_json(),
            "/agent-url" => self.agent_url(&request).await,
            _ => Response::error(404, "endpoints: /metrics, /sandboxes, /agent-url?sandbox=ID"),
        }
    }
}

/// Look up pod metadata for sandboxes that have none, forever.
async fn label_from_cri(sandboxes: Arc<Sandboxes>, socket: PathBuf) {
    let mut client = None;
    loop {
        let missing: Vec<String> = sandboxes.list().into_iter().filter(|e| e.cri.is_none()).map(|e| e.id).collect();
        if !missing.is_empty() {
            if client.is_none() {
                match crate::cri::connect_with_timeout(&socket, Duration::from_secs(2)).await {
                    Ok(c) => client = Some(c),
                    Err(e) => tracing::debug!(error = %crate::sandbox::error_chain(&e), "CRI not reachable yet"),
                }
            }
            if let Some(c) = &client {
                match c.list_pod_sandboxes().await {
                    Ok(list) => {
                        for info in list.into_iter().filter(|i| missing.contains(&i.id)) {
                            tracing::info!(sandbox = %info.id, pod = %info.meta.name, "CRI pod metadata");
                            sandboxes.set_cri(&info.id, info.meta);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %crate::sandbox::error_chain(&e), "ListPodSandbox failed");
                        client = None;
                    }
                }
            }
        }
        tokio::time::sleep(CRI_RETRY_INTERVAL).await;
    }
}

/// Run the monitor until the process is stopped.
pub async fn run(options: MonitorOptions) -> Result<(), MonitorError> {
    let sandboxes = Arc::new(Sandboxes::default());
    let _watcher =
        sbs_watch::SbsWatcher::start(options.sbs_root.clone(), sandboxes.clone()).map_err(MonitorError::Watch)?;
    if let Some(socket) = options.cri_socket.clone() {
        tokio::spawn(label_from_cri(sandboxes.clone(), socket));
    }
    let listener =
        tokio::net::TcpListener::bind(options.listen).await.map_err(|e| MonitorError::Listen(options.listen, e))?;
    tracing::info!(listen = %options.listen, sbs_root = %options.sbs_root.display(), "tern monitor serving");
    let handler: Arc<dyn Handler> = Arc::new(MonitorEndpoint::new(sandboxes, options.scrape_timeout));
    http::serve_tcp(listener, handler).await;
    Ok(())
}

#[cfg(test)]
mod tests;
