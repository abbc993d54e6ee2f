//! Redis failovers for tests: throw-away `redis-server` processes and a TCP
//! proxy that plays the part of the address clients use (a DNS name, a
//! Sentinel-managed endpoint, a Kubernetes Service): new connections go to
//! whichever server it points at now; connections already made stay put.

use std::net::{Ipv4Addr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

/// A `redis-server` of the test's own, killed when dropped.
pub struct Server {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts one on a free port and waits until it answers.
    pub fn start() -> Server {
        let port = StdListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            // A primary otherwise waits 5 s for more replicas before a full sync.
            .args(["--repl-diskless-sync-delay", "0"])
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

    /// A blocking connection to it.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis-server")
    }

    fn ping(&self) -> redis::RedisResult<String> {
        redis::Client::open(self.url())?
            .get_connection()
            .and_then(|mut c| redis::cmd("PING").query(&mut c))
    }

    /// Makes this server a replica of `primary` (demotes it if it was a primary).
    pub fn replicate(&self, primary: &Server) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(primary.port)
            .query(&mut self.client())
            .expect("REPLICAOF");
    }

    /// The URL of this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Makes this replica a primary.
    pub fn promote(&self) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut self.client())
            .expect("REPLICAOF NO ONE");
    }

    /// Waits until this replica has loaded its primary's data and follows it.
    pub fn wait_synced(&self) {
        self.wait_replication_info("synced", |info| info.contains("master_link_status:up"));
    }

    /// Waits until this primary counts `n` connected replicas.
    pub fn wait_connected_replicas(&self, n: usize) {
        let line = format!("connected_slaves:{n}\r");
        self.wait_replication_info(&format!("{n} replicas"), |info| info.contains(&line));
    }

    /// Polls `INFO replication` (for 10 s at most) until `done` holds of it.
    fn wait_replication_info(&self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut self.client())
                .expect("INFO replication");
            if done(&info) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                ":{} never {what}:\n{info}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every write made on this primary so far has reached its replica.
    pub fn wait_replicated(&self) {
        // WAIT waits for the calling connection's own writes only, so write a
        // marker first: the replication stream is one ordered log, and once
        // the marker is acknowledged every write before it (any client's) is.
        let mut c = self.client();
        let _: () = redis::cmd("SET")
            .arg("cptest-failover:marker")
            .arg(1)
            .query(&mut c)
            .expect("marker write");
        let acked: i64 = redis::cmd("WAIT")
            .arg(1)
            .arg(10_000)
            .query(&mut c)
            .expect("WAIT");
        assert_eq!(acked, 1, "the replica did not acknowledge the writes");
    }

    /// GET `key` on this server.
    pub fn get(&self, key: &str) -> Option<String> {
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
pub struct Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    backend: Arc<AtomicU16>,
}

impl Proxy {
    /// Starts a proxy to `backend` on a free port.
    pub async fn start(backend: u16) -> Proxy {
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

    /// Sends new connections to `server` from now on.
    pub fn point_at(&self, server: &Server) {
        self.backend.store(server.port, Ordering::SeqCst);
    }
}

/// A primary A with a synced replica B behind a proxy pointing at A, as
/// before a failover.
pub struct Pair {
    /// The primary (until [`Pair::fail_over`]).
    pub a: Server,
    /// The replica (the primary after [`Pair::fail_over`]).
    pub b: Server,
    /// The address clients use.
    pub proxy: Proxy,
}

impl Pair {
    /// Starts A, B replicating A, and the proxy.
    pub async fn start() -> Pair {
        let a = Server::start();
        let b = Server::start();
        b.replicate(&a);
        b.wait_synced();
        let proxy = Proxy::start(a.port).await;
        Pair { a, b, proxy }
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.proxy.port)
    }

    /// Fails over as Sentinel does, once B has every write A took: promotes
    /// B, points the address at it, and demotes A to B's replica. Connections
    /// opened before stay on A, which now refuses writes (`READONLY`).
    pub fn fail_over(&self) {
        self.a.wait_replicated();
        self.b.promote();
        self.proxy.point_at(&self.b);
        self.a.replicate(&self.b);
    }
}
