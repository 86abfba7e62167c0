//! Opening a session: TCP connect and SSH handshake, the controller's host key checked against
//! known_hosts (another key type tried when the first offered is not the pinned one), and the
//! login with the private key file, all within the connect timeout.

use super::*;

/// Host key algorithms grouped by key type, tried in turn when the first key is not the pinned one.
const HOST_KEY_TYPES: [&str; 5] = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512,rsa-sha2-256,ssh-rsa",
];

/// libssh2's code for "cannot read the key file".
const LIBSSH2_ERROR_FILE: i32 = -16;

impl SshGrid {
    /// Opens an authenticated session, all of it within the connect timeout.
    pub(super) async fn open(&self) -> Result<Session, GridError> {
        let deadline = Instant::now() + self.connect_timeout;
        let mut session = self.handshake(deadline, None).await?;
        match self.check_host_key(&session) {
            Ok(()) => {}
            Err(changed @ GridError::HostKeyChanged { .. }) => {
                // libssh2 picks the host key type by its own preference; known_hosts may pin
                // another type the server also has (`ssh` records only the type it negotiated).
                // The key has changed only if no type the server offers matches a pinned key.
                let negotiated = session
                    .methods(MethodType::HostKey)
                    .unwrap_or_default()
                    .to_string();
                drop(session);
                session = self
                    .handshake_with_other_key_type(deadline, &negotiated)
                    .await
                    .ok_or(changed)?;
            }
            Err(e) => return Err(e),
        }
        let user = self.controller.user_or_default();
        check_key_file(&self.key_file)?;
        let auth = timeout_at(
            deadline,
            session.userauth_pubkey_file(user, None, &self.key_file, None),
        )
        .await
        .map_err(|_| {
            self.connect_err(format!(
                "login as {user} timed out after {}s",
                self.connect_timeout.as_secs_f64()
            ))
        })?;
        let auth_err = |reason: String| GridError::Auth {
            addr: self.addr(),
            user: user.to_string(),
            key_file: self.key_file.clone(),
            reason,
        };
        match auth {
            Err(e) if ssh2_code(&e) == Some(LIBSSH2_ERROR_FILE) => {
                return Err(GridError::Key {
                    path: self.key_file.clone(),
                    reason: format!(
                        "not an unencrypted OpenSSH/PEM private key libssh2 can read ({})",
                        describe(&e)
                    ),
                })
            }
            Err(e) => return Err(auth_err(describe(&e))),
            Ok(()) if !session.authenticated() => {
                return Err(auth_err("not authenticated after login".into()))
            }
            Ok(()) => {}
        }
        Ok(session)
    }

    /// TCP connect and SSH handshake, optionally offering only the host key algorithms `prefs`.
    pub(super) async fn handshake(
        &self,
        deadline: Instant,
        prefs: Option<&str>,
    ) -> Result<Session, GridError> {
        let limit = self.connect_timeout.as_secs_f64();
        let (host, port) = (
            self.controller.host.as_str(),
            self.controller.port_or_default(),
        );

        let addrs: Vec<SocketAddr> = timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| self.connect_err(format!("resolving {host} timed out after {limit}s")))?
            .map_err(|e| self.connect_err(format!("cannot resolve {host}: {e}")))?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match timeout_at(deadline, TokioTcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    stream = Some(s);
                    break;
                }
                Ok(Err(e)) => last = Some(format!("{a}: {e}")),
                Err(_) => {
                    return Err(
                        self.connect_err(format!("TCP connect to {a} timed out after {limit}s"))
                    )
                }
            }
        }
        let stream = stream.ok_or_else(|| {
            self.connect_err(last.unwrap_or_else(|| format!("{host} has no address")))
        })?;
        // Commands are small messages in both directions: with Nagle's algorithm on, a channel
        // request waited for the ACK of the last command's close, which the controller delays by
        // 40 ms (measured: 40 of a reused session's 60 ms per `app list`).
        if let Err(e) = stream.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY: {e}");
        }

        let mut session = Session::new(stream, None).map_err(|e| {
            self.connect_err(format!("cannot start an SSH session: {}", describe(&e)))
        })?;
        if let Some(prefs) = prefs {
            session
                .method_pref(MethodType::HostKey, prefs)
                .await
                .map_err(|e| {
                    self.connect_err(format!("host key types {prefs}: {}", describe(&e)))
                })?;
        }
        timeout_at(deadline, session.handshake())
            .await
            .map_err(|_| {
                self.connect_err(format!(
                    "no SSH handshake within {limit}s (is an SSH server listening on port {port}?)"
                ))
            })?
            .map_err(|e| self.connect_err(format!("SSH handshake failed: {}", describe(&e))))?;
        Ok(session)
    }

    /// Handshakes again offering one other host key type at a time; returns the first session
    /// whose host key is pinned. A type the server lacks just fails its handshake.
    pub(super) async fn handshake_with_other_key_type(
        &self,
        deadline: Instant,
        negotiated: &str,
    ) -> Option<Session> {
        for prefs in HOST_KEY_TYPES {
            if prefs.split(',').any(|a| a == negotiated) {
                continue;
            }
            if Instant::now() >= deadline {
                return None;
            }
            match self.handshake(deadline, Some(prefs)).await {
                Ok(s) if self.check_host_key(&s).is_ok() => {
                    debug!(controller = %self.addr(), prefs, "pinned host key found with this type");
                    return Some(s);
                }
                Ok(_) => {}
                Err(e) => debug!(prefs, "no handshake with this host key type: {e}"),
            }
        }
        None
    }

    /// Refuses a controller whose host key is not pinned in `known_hosts`, or differs from it.
    pub(super) fn check_host_key(&self, session: &Session) -> Result<(), GridError> {
        let (host, port) = (
            self.controller.host.as_str(),
            self.controller.port_or_default(),
        );
        let (key, _) = session
            .host_key()
            .ok_or_else(|| self.connect_err("the server sent no host key"))?;
        let fingerprint = fingerprint(key, session);
        let mut kh = session
            .known_hosts()
            .map_err(|e| self.connect_err(format!("libssh2 known hosts: {}", describe(&e))))?;
        let path = &self.known_hosts;
        match std::fs::read_to_string(path) {
            // Line by line: libssh2 stops at the first line it cannot read (e.g. a key type it
            // does not know, or `@cert-authority`), and one such line must not hide the rest.
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    let t = line.trim();
                    if t.is_empty() || t.starts_with('#') {
                        continue;
                    }
                    if let Err(e) = kh.read_str(t, KnownHostFileKind::OpenSSH) {
                        warn!(
                            file = %path.display(),
                            line = n + 1,
                            "skipping a known_hosts line libssh2 cannot read: {}",
                            e.message()
                        );
                    }
                }
            }
            // No file yet: every key is unknown, and the error says how to create it.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(GridError::KnownHosts {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            }
        }
        let details = || {
            (
                self.addr(),
                host.to_string(),
                fingerprint.clone(),
                path.clone(),
            )
        };
        match kh.check_port(host, port, key) {
            CheckResult::Match => {
                debug!(controller = %self.addr(), %fingerprint, "host key matches known_hosts");
                Ok(())
            }
            CheckResult::NotFound => {
                let (addr, host, fingerprint, known_hosts) = details();
                Err(GridError::UnknownHostKey {
                    addr,
                    host,
                    port,
                    fingerprint,
                    known_hosts,
                })
            }
            CheckResult::Mismatch => {
                let (addr, host, fingerprint, known_hosts) = details();
                Err(GridError::HostKeyChanged {
                    addr,
                    host,
                    port,
                    fingerprint,
                    known_hosts,
                })
            }
            CheckResult::Failure => Err(GridError::KnownHosts {
                path: path.clone(),
                reason: format!("libssh2 could not check host key {fingerprint} against it"),
            }),
        }
    }
}

/// `SHA256:…` as `ssh-keygen -l` prints it, so a person can compare it with the controller's.
pub(super) fn fingerprint(key: &[u8], session: &Session) -> String {
    match ssh_key::PublicKey::from_bytes(key) {
        Ok(k) => k.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        // A key type ssh-key does not know: still show a SHA-256 digest of it.
        Err(_) => session
            .host_key_hash(HashType::Sha256)
            .map(|h| format!("SHA256(hex):{}", hex(h)))
            .unwrap_or_else(|| "(unknown)".into()),
    }
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A clear error for a missing or unreadable key file, rather than libssh2's generic one.
pub(super) fn check_key_file(path: &Path) -> Result<(), GridError> {
    let bad = |reason: String| GridError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    // Reading it proves the permission; the contents are never logged.
    std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    Ok(())
}
