//! The session against a real Mosquitto (anonymous, plain TCP, on a free loopback port).

use super::*;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

pub(crate) struct Broker {
    pub(crate) port: u16,
    config: std::path::PathBuf,
    child: Option<Child>,
}

impl Broker {
    pub(crate) fn start() -> Broker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir =
            std::env::temp_dir().join(format!("capture-mqtt-core-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("mosquitto.conf");
        let user = std::env::var("USER").unwrap_or_else(|_| "root".to_owned());
        std::fs::write(
            &config,
            format!(
                "user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            ),
        )
        .unwrap();
        let mut broker = Broker {
            port,
            config,
            child: None,
        };
        broker.spawn();
        broker
    }

    pub(crate) fn spawn(&mut self) {
        let binary = [
            "/usr/sbin/mosquitto",
            "/usr/local/sbin/mosquitto",
            "mosquitto",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("mosquitto");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (make test installs it)");
        self.child = Some(child);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("mosquitto did not start on port {}", self.port);
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(port: u16, protocol: Protocol) -> SessionConfig {
    let mut config = SessionConfig::new("127.0.0.1", Transport::Mqtt);
    config.port = port;
    config.protocol = protocol;
    config.reconnect.min_delay = Duration::from_millis(20);
    config.reconnect.max_delay = Duration::from_millis(200);
    config
}

async fn next_point(route: &Route) -> RawPoint {
    let queue = Arc::clone(&route.queue);
    let popped = tokio::task::spawn_blocking(move || queue.pop_wait(Some(Duration::from_secs(5))))
        .await
        .unwrap();
    match popped {
        Pop::Item(Item::Point { point, .. }) => point,
        other => panic!("expected a data point, got {other:?}"),
    }
}

fn round_trip(protocol: Protocol) {
    let mut broker = Broker::start();
    runtime().block_on(async {
        let session = Session::new(config(broker.port, protocol), None).unwrap();
        session.connect().await.unwrap();
        let route = session
            .subscribe("v1/raw/AcmeCorp/#", 1, Decode::Raw, 100, Overflow::Block)
            .unwrap();
        session
            .wait_granted(&route, Duration::from_secs(5))
            .await
            .unwrap();
        let topic = "v1/raw/AcmeCorp/S/C/M/K".to_owned();
        let payload = Bytes::from_static(br#"{"Value": 55, "UtcTimestamp": 1731061326260}"#);
        session
            .publish(
                topic.clone(),
                payload.clone(),
                1,
                false,
                Duration::from_secs(5),
            )
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        let point = next_point(&route).await;
        assert_eq!(point.value, serde_json::json!(55));
        assert_eq!(point.timestamp, 1_731_061_326_260_000_000);

        // The broker dies and comes back: the session reconnects and subscribes again by itself.
        broker.kill();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!session.is_connected());
        broker.spawn();
        for _ in 0..300 {
            if session.is_connected() && route.is_active() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(session.is_connected() && route.is_active());
        session
            .publish(topic, payload, 1, false, Duration::from_secs(5))
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(next_point(&route).await.value, serde_json::json!(55));
        assert!(session.stats().reconnects.load(Ordering::Relaxed) >= 1);

        session.close(Duration::from_secs(1)).await;
        assert!(route.queue.is_closed());
        let mut kinds = Vec::new();
        while let Pop::Item(event) = session.events().try_pop() {
            kinds.push(std::mem::discriminant(&event));
        }
        assert_eq!(kinds.last(), Some(&std::mem::discriminant(&Event::Closed)));
    });
}

#[test]
fn mqtt311_round_trip_and_reconnect() {
    round_trip(Protocol::V311);
}

#[test]
fn mqtt5_round_trip_and_reconnect() {
    round_trip(Protocol::V5);
}

#[test]
fn first_connection_failure_is_reported() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    runtime().block_on(async {
        let session = Session::new(config(port, Protocol::V311), None).unwrap();
        let err = session.connect().await.unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        assert!(session.is_closed());
    });
}
