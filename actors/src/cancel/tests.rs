use super::*;

fn by(user: &str) -> Cancelled {
    Cancelled {
        user: user.into(),
        from: "127.0.0.1".into(),
        at: crate::op::now(),
    }
}

#[test]
fn a_cancel_and_the_cut_over_have_exactly_one_winner() {
    // The cancel first: the cut-over is refused, and a second cancel gets the first's name.
    let g = Gate::new(GateState::Open);
    assert_eq!(g.cancel(by("ops")).unwrap().user, "ops");
    assert_eq!(g.pass().unwrap_err().user, "ops");
    assert_eq!(g.cancel(by("other")).unwrap().user, "ops");
    assert_eq!(g.cancelled().unwrap().user, "ops");
    // The cut-over first: the cancel is refused, and passing again is harmless.
    let g = Gate::new(GateState::Open);
    assert_eq!(g.pass(), Ok(()));
    assert_eq!(g.cancel(by("ops")).unwrap_err(), GateState::CutOver);
    assert_eq!(g.pass(), Ok(()));
    assert!(g.cancelled().is_none());
    // A failure rolling back: nothing left to cancel.
    let g = Gate::new(GateState::Open);
    g.rolling_back();
    assert_eq!(g.cancel(by("ops")).unwrap_err(), GateState::RollingBack);
}

#[test]
fn racing_threads_never_both_win() {
    for _ in 0..200 {
        let g = Gate::new(GateState::Open);
        let (a, b) = (g.clone(), g.clone());
        let t1 = std::thread::spawn(move || a.cancel(by("ops")).is_ok());
        let t2 = std::thread::spawn(move || b.pass().is_ok());
        let (cancelled, cut_over) = (t1.join().unwrap(), t2.join().unwrap());
        assert!(cancelled != cut_over, "exactly one wins");
    }
}

#[tokio::test]
async fn a_waiting_step_hears_the_cancel() {
    let g = Gate::new(GateState::Open);
    let w = tokio::spawn({
        let g = g.clone();
        async move { g.wait_cancelled().await }
    });
    tokio::task::yield_now().await;
    g.cancel(by("ops")).unwrap();
    assert_eq!(w.await.unwrap().user, "ops");
}

#[test]
fn a_forwarded_cancel_is_bound_to_its_operation_receiver_and_time() {
    let app = AppKey::from_secret_bytes(b"secret");
    let id = crate::op::new_id();
    let k = app.op_key(&id);
    let nonce = crate::handoff::nonce();
    let to = (Role::Helper, "mighelper-01234567");
    let (ts, sig) = k.sign_cancel(&id, &nonce, to, b"{}");
    let now = crate::auth::unix_now();
    let stamp = |nonce| CancelSig {
        timestamp: ts,
        nonce,
        signature: &sig,
    };
    assert!(k.verify_cancel(&id, stamp(&nonce), to, b"{}", now).is_ok());
    let other_app = (Role::Target, "shop2");
    assert!(
        k.verify_cancel(&id, stamp(&nonce), other_app, b"{}", now)
            .is_err(),
        "another receiver"
    );
    assert!(
        k.verify_cancel(&id, stamp(&nonce), to, b"{\"x\":1}", now)
            .is_err(),
        "another body"
    );
    let other_nonce = crate::handoff::nonce();
    assert!(
        k.verify_cancel(&id, stamp(&other_nonce), to, b"{}", now)
            .is_err(),
        "another nonce"
    );
    let other = app.op_key(&crate::op::new_id());
    assert!(
        other
            .verify_cancel(&id, stamp(&nonce), to, b"{}", now)
            .is_err(),
        "another operation's key"
    );
    assert!(
        k.verify_cancel(&id, stamp(&nonce), to, b"{}", now + 3600)
            .is_err(),
        "stale"
    );
}

#[tokio::test]
async fn a_replayed_forwarded_cancel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let book = OpBook::open(crate::journal::Journal::open(dir.path()).unwrap()).unwrap();
    let mut op = crate::op::tests::sample_op();
    op.owner = Role::Target;
    op.plan.helper_app = crate::op::helper_app_name(&op.id);
    book.commit(&op).unwrap();
    let app = AppKey::from_secret_bytes(b"secret");
    let c = Canceller::new(
        book,
        Keys::App(app.clone()),
        vec![(Role::Target, "shop2".into())],
    );
    let body = serde_json::to_vec(&by("ops")).unwrap();
    let nonce = crate::handoff::nonce();
    let (ts, sig) = app
        .op_key(&op.id)
        .sign_cancel(&op.id, &nonce, (Role::Target, "shop2"), &body);
    let signed = SignedCancel {
        op_id: op.id.clone(),
        timestamp: ts,
        nonce,
        signature: sig,
        body,
    };
    // Taken (and refused as past the cut-over, since the Target owns it), then a replay.
    let first = c.from_peer(signed.clone()).await.unwrap_err();
    assert!(
        first
            .to_string()
            .contains("past the cut-over: the application already runs on g2"),
        "{first}"
    );
    let again = c.from_peer(signed.clone()).await.unwrap_err();
    assert!(
        matches!(again, CancelError::Auth(ref m) if m.contains("replayed")),
        "{again}"
    );
    let mut forged = signed;
    forged.nonce = crate::handoff::nonce();
    assert!(matches!(
        c.from_peer(forged).await,
        Err(CancelError::Auth(_))
    ));
}
