use super::*;
use crate::op::{Kind, Role};
use std::io::{Read, Write};

fn runner(dir: &std::path::Path) -> StepRunner {
    let book = OpBook::open(crate::journal::Journal::open(dir).unwrap()).unwrap();
    StepRunner::new(book, Arc::new(crate::memory_lab::MemoryLab::new()))
}

fn op() -> Op {
    let plan: crate::op::Plan = serde_json::from_value(serde_json::json!({
        "source_grid": "g1", "target_grid": "g2", "source_app": "shop", "target_app": "shop2",
        "source_controller": "127.0.1.1:2222", "target_controller": "127.0.2.1:2222",
        "source_mig_url": "http://a", "helper_url": "http://b", "final_mig_url": "http://c",
        "helper_app": "mighelper-x", "helper_config": [], "target_app_config": []
    }))
    .unwrap();
    let mut op = Op::new(crate::op::new_id(), Kind::Migrate, plan);
    op.owner = Role::Target;
    op.seq = 3;
    op
}

/// Serves one status request: `answer` builds the body from the nonce the request carries;
/// `sign` signs it (or not). Returns the base URL.
fn answer_once(
    status: &'static str,
    answer: impl FnOnce(String) -> String + Send + 'static,
    sign: Option<OpKey>,
) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap_or(0);
        let req = String::from_utf8_lossy(&buf[..n]).to_string();
        let nonce = req
            .split("nonce=")
            .nth(1)
            .map(|r| r.chars().take_while(|c| c.is_ascii_hexdigit()).collect())
            .unwrap_or_default();
        let body = answer(nonce);
        let sig = sign
            .map(|k| format!("x-mig-signature: {}\r\n", k.sign_status(body.as_bytes())))
            .unwrap_or_default();
        let _ = write!(
            c,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{sig}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    url
}

/// A status answer for `op` as its receiver, the target MIG of `shop2`, would sign it.
fn says(op: &Op, owner: Role, seq: u64) -> impl FnOnce(String) -> String {
    let id = op.id.clone();
    move |nonce| {
        serde_json::to_string(&StatusAnswer {
            op_id: id,
            nonce,
            role: Role::Target,
            app: "shop2".into(),
            known: true,
            owner: Some(owner),
            seq,
            state: Some(crate::op::OpState::Running),
            rolling_back: false,
        })
        .unwrap()
    }
}

fn key_of(op: &Op) -> OpKey {
    crate::auth::AppKey::from_secret_bytes(b"k").op_key(&op.id)
}

#[tokio::test]
async fn a_signed_answer_that_the_receiver_owns_the_operation_means_taken() {
    let dir = tempfile::tempdir().unwrap();
    let d = runner(dir.path());
    let mine = op();
    let k = key_of(&mine);
    let same = answer_once("200 OK", says(&mine, Role::Target, 3), Some(k.clone()));
    assert_eq!(d.probe(&same, &k, "shop2", &mine).await, Probe::Taken);
    let ahead = answer_once("200 OK", says(&mine, Role::Target, 4), Some(k.clone()));
    assert_eq!(
        d.probe(&ahead, &k, "shop2", &mine).await,
        Probe::Taken,
        "a later sequence number"
    );
}

#[tokio::test]
async fn a_signed_answer_of_another_owner_or_an_older_handoff_means_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let d = runner(dir.path());
    let mine = op();
    let k = key_of(&mine);
    let url = answer_once("200 OK", says(&mine, Role::Helper, 3), Some(k.clone()));
    assert!(matches!(
        d.probe(&url, &k, "shop2", &mine).await,
        Probe::NotTaken(_)
    ));
    let url = answer_once("200 OK", says(&mine, Role::Target, 2), Some(k.clone()));
    assert!(matches!(
        d.probe(&url, &k, "shop2", &mine).await,
        Probe::NotTaken(_)
    ));
    let id = mine.id.clone();
    let unknown = move |nonce| {
        serde_json::to_string(&StatusAnswer {
            op_id: id,
            nonce,
            role: Role::Target,
            app: "shop2".into(),
            known: false,
            owner: None,
            seq: 0,
            state: None,
            rolling_back: false,
        })
        .unwrap()
    };
    let url = answer_once("200 OK", unknown, Some(k.clone()));
    assert!(matches!(
        d.probe(&url, &k, "shop2", &mine).await,
        Probe::NotTaken(_)
    ));
}

#[tokio::test]
async fn an_answer_that_cannot_be_trusted_decides_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = runner(dir.path());
    let mine = op();
    let k = key_of(&mine);
    let unknown = |p: Probe| matches!(p, Probe::Unknown(_));
    // Unsigned, signed with another operation's key, an old answer replayed (another
    // nonce), another application's, an error, nothing listening.
    let url = answer_once("200 OK", says(&mine, Role::Target, 3), None);
    assert!(unknown(d.probe(&url, &k, "shop2", &mine).await), "unsigned");
    let other = crate::auth::AppKey::from_secret_bytes(b"k").op_key(&crate::op::new_id());
    let url = answer_once("200 OK", says(&mine, Role::Target, 3), Some(other));
    assert!(
        unknown(d.probe(&url, &k, "shop2", &mine).await),
        "another key"
    );
    let stale = says(&mine, Role::Target, 3);
    let url = answer_once(
        "200 OK",
        move |_| stale(crate::op::new_id()),
        Some(k.clone()),
    );
    assert!(
        unknown(d.probe(&url, &k, "shop2", &mine).await),
        "another nonce"
    );
    let url = answer_once("200 OK", says(&mine, Role::Target, 3), Some(k.clone()));
    assert!(
        unknown(d.probe(&url, &k, "shop", &mine).await),
        "another application"
    );
    let url = answer_once("503 Service Unavailable", |_| "{}".into(), Some(k.clone()));
    assert!(unknown(d.probe(&url, &k, "shop2", &mine).await), "an error");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    assert!(
        unknown(d.probe(&closed, &k, "shop2", &mine).await),
        "nothing listening"
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_not_retried_and_a_passing_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = runner(dir.path());
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let r: Result<(), StepError> = d
        .retry("x", || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(StepError::permanent("refused key"))
        })
        .await;
    assert_eq!(r.unwrap_err().message, "refused key");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let r: Result<(), StepError> = d
        .retry("x", || async {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(StepError::from("connection reset".to_string()))
        })
        .await;
    assert!(r.is_err());
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1 + BACKOFF.len()
    );
}

#[test]
fn grid_errors_that_cannot_pass_are_permanent() {
    let refused = GridError::Auth {
        addr: "a".into(),
        user: "root".into(),
        key_file: "k".into(),
        reason: "denied".into(),
    };
    assert!(StepError::from(refused).permanent);
    let exit2 = GridError::Command {
        addr: "a".into(),
        command: "app start x".into(),
        exit_code: Some(2),
        status: "exited with code 2".into(),
        stderr: "no such application".into(),
    };
    assert!(StepError::from(exit2).permanent);
    let broke = GridError::Connect {
        addr: "a".into(),
        reason: "connection refused".into(),
    };
    assert!(!StepError::from(broke).permanent);
    let huge = GridError::Command {
        addr: "a".into(),
        command: "app start x".into(),
        exit_code: Some(1),
        status: "exited with code 1".into(),
        stderr: "e".repeat(16 << 20),
    };
    let e = StepError::from(huge);
    assert!(e.message.len() < 8192, "{}", e.message.len());
    assert!(e.message.ends_with("bytes more"));
}
