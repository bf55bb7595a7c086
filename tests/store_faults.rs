//! Redis faults under a running service, with a `redis-server` of the test's own (append-only
//! file on, as `deploy/redis.conf` recommends): killed with `kill -9` and restarted, and paused
//! with `SIGSTOP`. While Redis is away every request fails within its deadline with
//! `store_unavailable` and the socket stays open; once it is back the service answers again
//! within seconds; no acknowledged turn is lost.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, test_config, Client, TestServer};

/// A request made while Redis is away must fail within this long.
const DEADLINE: Duration = Duration::from_secs(2);
/// Once Redis is back, the service must answer again within this long.
const RECOVERY: Duration = Duration::from_secs(3);

struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.spawn();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let dir: PathBuf = self.dir.path().into();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/deps installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + common::WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.kill9();
    }
}

async fn server_on(redis: &Redis) -> TestServer {
    let mut config = test_config();
    config.store.url = redis.url();
    TestServer::start(config).await
}

/// While Redis is away: the message fails in time with `store_unavailable`, and `/ready` says 503
/// in time; the socket stays open.
async fn refused_in_time(server: &TestServer, client: &mut Client, session: &str) {
    let asked = Instant::now();
    let error = client.try_turn(session, "while it is away", "away").await.unwrap_err();
    let took = asked.elapsed();
    assert_eq!(error["error"]["code"], "store_unavailable", "{error}");
    assert!(took < DEADLINE, "refused after {took:?}");
    let asked = Instant::now();
    let (status, body) = http_get(&server.http_url("/ready")).await;
    let took = asked.elapsed();
    assert_eq!(status, 503, "{body}");
    assert!(took < DEADLINE, "/ready answered after {took:?}");
}

/// Once Redis is back: the next turn succeeds within `RECOVERY` (retrying), on the same socket.
async fn answers_again(client: &mut Client, session: &str, back: Instant) -> Duration {
    loop {
        match client.try_turn(session, "back again", "back").await {
            Ok(events) => {
                assert_eq!(events.last().unwrap()["status"], "completed", "{events:?}");
                return back.elapsed();
            }
            Err(e) => {
                assert_eq!(e["error"]["code"], "store_unavailable", "{e}");
                assert!(
                    back.elapsed() < RECOVERY,
                    "still refused {:?} after Redis came back",
                    back.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn contents(client: &mut Client, session: &str) -> Vec<String> {
    client
        .history(session)
        .await
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn redis_killed_and_restarted_loses_no_acknowledged_turn() {
    let mut redis = Redis::start();
    let server = server_on(&redis).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    for i in 0..3 {
        client
            .try_turn(&session, &format!("turn {i}"), &format!("t{i}"))
            .await
            .unwrap();
    }

    redis.kill9();
    refused_in_time(&server, &mut client, &session).await;
    redis.spawn();
    let back = Instant::now();
    let recovered = answers_again(&mut client, &session, back).await;
    eprintln!("after kill -9 and restart: answering again {recovered:?} after Redis was back");

    let history = contents(&mut client, &session).await;
    let users: Vec<&String> = history.iter().step_by(2).collect();
    assert_eq!(
        users,
        vec!["turn 0", "turn 1", "turn 2", "back again"],
        "every acknowledged turn survived: {history:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn redis_paused_fails_requests_in_time_and_recovers() {
    let redis = Redis::start();
    let server = server_on(&redis).await;
    let mut client = server.connect().await;
    let session = client.create_session().await;
    client.try_turn(&session, "before", "b").await.unwrap();

    redis.signal("STOP");
    let paused = Instant::now();
    refused_in_time(&server, &mut client, &session).await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(paused.elapsed())).await;
    redis.signal("CONT");
    let back = Instant::now();
    let recovered = answers_again(&mut client, &session, back).await;
    eprintln!("after a 5 s SIGSTOP: answering again {recovered:?} after SIGCONT");
    let history = contents(&mut client, &session).await;
    assert_eq!(
        history.iter().step_by(2).collect::<Vec<_>>(),
        vec!["before", "back again"],
        "{history:?}"
    );
    server.stop().await;
}
