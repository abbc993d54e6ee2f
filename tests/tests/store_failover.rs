//! A Redis failover behind one address: the store follows it.
//!
//! Two throw-away `redis-server`s (A and B) sit behind a TCP proxy that plays
//! the part of a DNS name, Sentinel-managed endpoint or Kubernetes Service:
//! new connections go wherever it points now. The test points it from A to B
//! and demotes A to a replica of B, as a failover does. The store's open
//! connection still leads to A, so its next write is refused `READONLY`;
//! after that the store must reconnect and reach B. redis-rs alone keeps the
//! old connection (it only reconnects on I/O errors), so without cronpipe's
//! watch every write would be refused for good: the producer could never hold
//! the lease again, the worker never claim a task.

use std::net::{Ipv4Addr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cronpipe_shared::store::{Claim, Outcome, Store, StoreError};
use tokio::net::{TcpListener, TcpStream};

/// A `redis-server` of the test's own, killed when dropped.
struct Server {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let port = StdListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        let server = Server {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server :{port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn client(&self) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .and_then(|c| c.get_connection())
            .expect("connect to test redis-server")
    }

    fn ping(&self) -> redis::RedisResult<String> {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?
            .get_connection()
            .and_then(|mut c| redis::cmd("PING").query(&mut c))
    }

    /// Demotes this server to a replica of `primary`.
    fn replicate(&self, primary: &Server) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(primary.port)
            .query(&mut self.client())
            .expect("REPLICAOF");
    }

    fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query(&mut self.client())
            .expect("GET")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards each new connection to the backend it points at when the
/// connection is made; connections already made stay where they are.
struct Proxy {
    port: u16,
    backend: Arc<AtomicU16>,
}

impl Proxy {
    async fn start(backend: u16) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let backend = Arc::new(AtomicU16::new(backend));
        let target = backend.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = target.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect((Ipv4Addr::LOCALHOST, to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy { port, backend }
    }

    fn point_at(&self, server: &Server) {
        self.backend.store(server.port, Ordering::SeqCst);
    }
}

/// A store behind the proxy, connected to A, with the failover to B done:
/// the proxy points at B and A is B's replica.
async fn failed_over() -> (Store, Server, Server, Proxy) {
    let a = Server::start();
    let b = Server::start();
    let proxy = Proxy::start(a.port).await;
    let store = Store::connect(
        &format!("redis://127.0.0.1:{}", proxy.port),
        "cptest-failover",
        Duration::from_secs(2),
    )
    .await
    .expect("connect through the proxy");
    // A live connection to A, as before any failover.
    store.ping().await.expect("ping A");
    proxy.point_at(&b);
    a.replicate(&b);
    (store, a, b, proxy)
}

/// Retries `op` until it succeeds, for at most 10 s, and returns its value.
/// The first call must fail with `READONLY` (the old connection leads to A).
async fn succeeds_after_readonly<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    match op().await {
        Err(e) => {
            assert!(
                e.to_string().contains("read only replica"),
                "first error: {e}"
            );
            assert!(e.is_transient(), "READONLY must be worth retrying");
        }
        Ok(_) => panic!("the write reached the demoted server and was not refused"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match op().await {
            Ok(v) => return v,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still failing 10 s after the failover: {last}");
}

#[tokio::test]
async fn a_script_refused_readonly_reconnects_to_the_new_primary() {
    let (store, a, b, _proxy) = failed_over().await;
    let token = succeeds_after_readonly(|| store.lease_acquire("p2", Duration::from_secs(30)))
        .await
        .expect("B has no leader, so the lease is free");
    let leader = store.keys().leader();
    let value = b.get(&leader).expect("the lease is held on B");
    assert_eq!(value, format!("{token}:p2"));
    assert!(a.get(&leader).is_none_or(|v| v == value));
}

#[tokio::test]
async fn a_pipeline_refused_readonly_reconnects_to_the_new_primary() {
    let (store, _a, b, _proxy) = failed_over().await;
    let ttl = Duration::from_secs(30);
    let keep = Duration::from_secs(60);
    let claim = succeeds_after_readonly(|| store.claim("k1", "w1", ttl, keep)).await;
    assert_eq!(claim, Claim::Claimed { attempt: 1 });
    assert_eq!(
        b.get(&store.keys().idem("k1")).as_deref(),
        Some("running:w1")
    );
}

#[tokio::test]
async fn a_command_refused_readonly_reconnects_to_the_new_primary() {
    let (store, _a, b, _proxy) = failed_over().await;
    let keep = Duration::from_secs(60);
    succeeds_after_readonly(|| store.finish("k2", "w1", Outcome::Done, keep)).await;
    assert_eq!(b.get(&store.keys().idem("k2")).as_deref(), Some("done"));
}
