//! The monitor against real unix-socket HTTP servers in a temp sbs directory.

use super::*;
use crate::metrics::sbs::SbsDir;
use tokio::net::UnixListener;

struct FakeShim(&'static str);

#[async_trait::async_trait]
impl Handler for FakeShim {
    async fn handle(&self, request: Request) -> Response {
        match request.path.as_str() {
            "/metrics" => Response::ok(PROMETHEUS_TEXT, self.0),
            "/agent-url" => Response::ok("text/plain", "hvsock:///x/vsock.sock:1024\n"),
            _ => Response::error(404, "no"),
        }
    }
}

const SHIM_TEXT: &str = "# HELP tern_guest_tasks Processes.\n# TYPE tern_guest_tasks gauge\ntern_guest_tasks 7.0\n\
                         # HELP tern_shim_fds Fds.\n# TYPE tern_shim_fds gauge\ntern_shim_fds 12.0\n";

fn serve_fake(root: &Path, id: &str) -> tokio::task::JoinHandle<()> {
    let dir = SbsDir::create(root, id).unwrap();
    let listener = UnixListener::bind(dir.monitor_socket()).unwrap();
    tokio::spawn(http::serve_unix(listener, Arc::new(FakeShim(SHIM_TEXT))))
}

async fn wait_for(sandboxes: &Sandboxes, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandboxes.list().len() != want {
        assert!(Instant::now() < deadline, "expected {want} sandboxes, have {:?}", sandboxes.list());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get(path: &str) -> Request {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    Request {
        path: p.to_owned(),
        query: q
            .split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_is_the_truth_and_stale_sockets_cost_one_failure() {
    let root = tempfile::tempdir().unwrap();
    let sbs = root.path().join("sbs");
    let sandboxes = Arc::new(Sandboxes::default());
    // Started before the directory exists: it must wait for it.
    let _watcher = sbs_watch::SbsWatcher::start(sbs.clone(), sandboxes.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sandboxes.list().is_empty());

    let a = serve_fake(root.path(), "sb-a");
    let b = serve_fake(root.path(), "sb-b");
    // A stale socket: bound, never accepted (a hung shim).
    let stale = SbsDir::create(root.path(), "sb-stale").unwrap();
    let _stale_listener = std::os::unix::net::UnixListener::bind(stale.monitor_socket()).unwrap();
    wait_for(&sandboxes, 3).await;

    let endpoint = MonitorEndpoint::new(sandboxes.clone(), Duration::from_millis(300));
    let started = Instant::now();
    let r = endpoint.handle(get("/metrics")).await;
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    assert_eq!(text.matches("# TYPE tern_guest_tasks gauge").count(), 1, "{text}");
    assert!(
        text.contains("tern_guest_tasks{sandbox_id=\"sb-a\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"} 7.0"),
        "{text}"
    );
    assert!(text.contains("sandbox_id=\"sb-b\""), "{text}");
    assert!(!text.contains("sb-stale"), "{text}");
    assert!(text.contains("tern_monitor_running_shims 3"), "{text}");
    assert!(text.contains("tern_monitor_scrape_failures_total 1\n"), "{text}");
    assert!(text.contains("tern_monitor_scrapes_total 3\n"), "{text}");
    assert!(text.contains("tern_monitor_scrape_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");

    // CRI metadata becomes labels.
    sandboxes.set_cri("sb-a", PodMeta { uid: "u-1".into(), name: "web".into(), namespace: "prod".into(), ready: true });
    let text = String::from_utf8(endpoint.handle(get("/metrics?filter_family=tern_shim")).await.body).unwrap();
    assert!(
        text.contains(
            "tern_shim_fds{sandbox_id=\"sb-a\",cri_uid=\"u-1\",cri_name=\"web\",cri_namespace=\"prod\"} 12.0"
        ),
        "{text}"
    );
    assert!(!text.contains("tern_guest_tasks"), "{text}");
    assert!(!text.contains("tern_monitor_"), "{text}");

    let list: serde_json::Value = serde_json::from_slice(&endpoint.handle(get("/sandboxes")).await.body).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    let url = endpoint.handle(get("/agent-url?sandbox=sb-b")).await;
    assert_eq!((url.status, url.body.as_slice()), (200, &b"hvsock:///x/vsock.sock:1024\n"[..]));
    assert_eq!(endpoint.handle(get("/agent-url?sandbox=nope")).await.status, 404);

    // Removing a directory removes the sandbox; the others stay.
    a.abort();
    std::fs::remove_dir_all(sbs.join("sb-a")).unwrap();
    wait_for(&sandboxes, 2).await;
    assert!(sandboxes.list().iter().all(|e| e.id != "sb-a"));
    // The whole directory going removes everything; it coming back is followed again.
    b.abort();
    std::fs::remove_dir_all(&sbs).unwrap();
    wait_for(&sandboxes, 0).await;
    let _c = serve_fake(root.path(), "sb-c");
    wait_for(&sandboxes, 1).await;
}
