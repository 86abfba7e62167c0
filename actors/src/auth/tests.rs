use super::*;

#[test]
fn the_audit_reads_the_user_and_never_the_password() {
    assert_eq!(
        basic_user(Some(&header("ops", "pw:with:colons"))).as_deref(),
        Some("ops")
    );
    assert_eq!(basic_user(Some("Bearer abc")), None);
    assert_eq!(basic_user(Some("Basic !!!")), None);
    assert_eq!(basic_user(None), None);
}

fn header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn keys() -> (AppKey, String, OpKey) {
    let app = AppKey::from_secret_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- test");
    let id = crate::op::new_id();
    let k = app.op_key(&id);
    (app, id, k)
}

fn to(app: &str, transition: Transition) -> Audience {
    Audience {
        role: crate::op::Role::Target,
        app: app.into(),
        transition,
    }
}

#[test]
fn a_signed_handoff_verifies_once() {
    let (_, id, k) = keys();
    let me = to("shop2", Transition::Forward);
    let s = k.sign(&id, 1, &me, b"{\"op\":1}");
    assert_eq!(k.verify(&s, &me, b"{\"op\":1}", 0, unix_now()), Ok(()));
    // The same message again is a replay.
    assert_eq!(
        k.verify(&s, &me, b"{\"op\":1}", 1, unix_now()),
        Err(HandoffAuthError::Replay { seq: 1, last: 1 })
    );
}

#[test]
fn a_handoff_is_bound_to_its_receiver_and_transition() {
    let (_, id, k) = keys();
    let me = to("shop2", Transition::Forward);
    let s = k.sign(&id, 1, &me, b"body");
    // Replayed to the source application's MIG, to MigHelper, or as a roll-back.
    for other in [
        to("shop", Transition::Forward),
        Audience {
            role: crate::op::Role::Helper,
            ..me.clone()
        },
        to("shop2", Transition::RollBack),
    ] {
        assert_eq!(
            k.verify(&s, &other, b"body", 0, unix_now()),
            Err(HandoffAuthError::BadSignature),
            "{other:?}"
        );
    }
}

#[test]
fn tampered_body_wrong_key_other_op_and_stale_are_refused() {
    let (app, id, k) = keys();
    let me = to("shop2", Transition::Forward);
    let s = k.sign(&id, 2, &me, b"body");
    assert_eq!(
        k.verify(&s, &me, b"bodY", 0, unix_now()),
        Err(HandoffAuthError::BadSignature)
    );
    let other_app = AppKey::from_secret_bytes(b"another key");
    assert_eq!(
        other_app
            .op_key(&id)
            .verify(&s, &me, b"body", 0, unix_now()),
        Err(HandoffAuthError::BadSignature)
    );
    // k_op of another operation cannot sign for this one.
    let other_op = crate::op::new_id();
    let forged = app.op_key(&other_op).sign(&id, 2, &me, b"body");
    assert_eq!(
        k.verify(&forged, &me, b"body", 0, unix_now()),
        Err(HandoffAuthError::BadSignature)
    );
    // A changed header (sequence) breaks the signature too.
    let bumped = Signed {
        seq: 3,
        ..s.clone()
    };
    assert_eq!(
        k.verify(&bumped, &me, b"body", 0, unix_now()),
        Err(HandoffAuthError::BadSignature)
    );
    let later = unix_now() + MAX_SKEW.as_secs() + 5;
    assert_eq!(
        k.verify(&s, &me, b"body", 0, later),
        Err(HandoffAuthError::Stale { ts: s.timestamp })
    );
}

#[test]
fn status_answers_verify_only_with_the_operations_key_and_never_as_handoffs() {
    let (app, id, k) = keys();
    let sig = k.sign_status(b"{\"known\":true}");
    assert!(k.verify_status(b"{\"known\":true}", &sig));
    assert!(!k.verify_status(b"{\"known\":false}", &sig));
    assert!(!app
        .op_key(&crate::op::new_id())
        .verify_status(b"{\"known\":true}", &sig));
    assert!(!k.verify_status(b"{\"known\":true}", "zz"));
    // A status signature is no handoff signature over the same bytes.
    let me = to("shop2", Transition::Forward);
    let as_handoff = Signed {
        op_id: id.clone(),
        timestamp: unix_now(),
        seq: 1,
        transition: Transition::Forward,
        signature: sig,
    };
    assert_eq!(
        k.verify(&as_handoff, &me, b"{\"known\":true}", 0, unix_now()),
        Err(HandoffAuthError::BadSignature)
    );
}

#[test]
fn headers_round_trip_and_op_keys_hex() {
    let (_, id, k) = keys();
    let s = k.sign(&id, 7, &to("a", Transition::RollBack), b"x");
    let h = s.headers();
    let back =
        Signed::from_headers(|n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.as_str())).unwrap();
    assert_eq!(back, s);
    assert_eq!(back.transition, Transition::RollBack);
    assert_eq!(OpKey::from_hex(&k.to_hex()), Some(k.clone()));
    assert_eq!(OpKey::from_hex("zz"), None);
    assert!(!format!("{k:?}").contains(&k.to_hex()[..8]));
    assert_eq!(
        Signed::from_headers(|n| if n == H_OP { Some("../x") } else { Some("1") }),
        Err(HandoffAuthError::Missing(H_OP))
    );
    assert_eq!(
        Signed::from_headers(|n| h
            .iter()
            .find(|(k, _)| *k == n && n != H_TRANSITION)
            .map(|(_, v)| v.as_str())),
        Err(HandoffAuthError::Missing(H_TRANSITION))
    );
}

#[test]
fn an_empty_username_means_no_authentication() {
    assert!(GuiCredentials::new("", &Secret::new("set anyway")).is_none());
}

#[test]
fn only_the_right_pair_passes() {
    let c = GuiCredentials::new("ops", &Secret::new("s3cret:with colon")).unwrap();
    assert!(c.check_header(Some(&header("ops", "s3cret:with colon"))));
    assert!(c.check_header(Some(
        &header("ops", "s3cret:with colon").replace("Basic", "basic")
    )));
    assert!(!c.check_header(Some(&header("ops", "s3cret"))));
    assert!(!c.check_header(Some(&header("op", "s3cret:with colon"))));
    assert!(!c.check_header(Some(&header("", ""))));
    assert!(!c.check_header(None));
    assert!(!c.check_header(Some("Bearer abc")));
    assert!(!c.check_header(Some("Basic !!!notbase64")));
    assert!(!c.check_header(Some("Basic")));
}

#[test]
fn mighelper_checks_the_same_credentials_from_a_mac_of_the_password() {
    let (_, _, k) = keys();
    let source = GuiCredentials::new("ops", &Secret::new("s3cret")).unwrap();
    let (user, mac) = source.for_helper(&k);
    assert!(
        !mac.contains("s3cret"),
        "the password itself is not handed on"
    );
    let helper = GuiCredentials::from_mac(&user, &k, &mac).unwrap();
    assert!(helper.check_header(Some(&header("ops", "s3cret"))));
    assert!(!helper.check_header(Some(&header("ops", "s3cre"))));
    assert!(!helper.check_header(Some(&header("op", "s3cret"))));
    // Another operation's key makes another MAC: it cannot be carried over.
    let other = AppKey::from_secret_bytes(b"x").op_key(&crate::op::new_id());
    let moved = GuiCredentials::from_mac(&user, &other, &mac).unwrap();
    assert!(!moved.check_header(Some(&header("ops", "s3cret"))));
    assert!(GuiCredentials::from_mac("", &k, &mac).is_none());
}

#[test]
fn the_handoff_secret_is_made_once_private_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("handoff.key");
    let a = AppKey::load_or_create(&p).unwrap();
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let b = AppKey::load_or_create(&p).unwrap();
    let id = crate::op::new_id();
    assert!(
        a.op_key(&id) == b.op_key(&id),
        "the same secret, the same key"
    );
    let other = dir.path().join("other.key");
    assert!(AppKey::load_or_create(&other).unwrap().op_key(&id) != a.op_key(&id));
    // MigHelper holds the SSH key; it yields no key that signs for the application.
    let ssh_key = b"-----BEGIN OPENSSH PRIVATE KEY----- the application's key";
    assert!(AppKey::from_secret_bytes(ssh_key).op_key(&id) != a.op_key(&id));
    std::fs::write(&p, "short").unwrap();
    let e = AppKey::load_or_create(&p).unwrap_err();
    assert!(e.to_string().contains("handoff.key"), "{e}");
}
