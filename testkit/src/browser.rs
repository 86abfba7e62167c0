//! A real headless Chromium driven over WebDriver, killed with its driver on drop: the `web`
//! crate's GUI tests and the root package's lab tests use it.

use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;

use crate::net::free_port;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The real binary: /usr/bin/chromium is a shell wrapper that adds flags of its own.
const CHROMIUM: [&str; 2] = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"];

/// One headless Chromium under its own chromedriver. Dropping it kills both: chromedriver runs
/// in a process group of its own, and the browser it starts stays in that group.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER} (scripts/setup installs it): {e}"));
        let profile = tempfile::tempdir().expect("a temporary browser profile");
        // Kill the driver even if Chromium never comes up.
        let mut guard = DriverGuard(Some(driver));

        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let binary = CHROMIUM
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromium is installed (scripts/setup)");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = caps.as_object().expect("an object").clone();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session from chromedriver");
        let browser = Browser {
            client,
            driver: guard.0.take().expect("the driver"),
            _profile: profile,
        };
        browser.set_viewport(1280, 800).await;
        browser
    }

    /// Sizes the window so that the page itself (and so a screenshot) is `width` × `height`.
    pub async fn set_viewport(&self, width: u32, height: u32) {
        self.client
            .set_window_size(width, height)
            .await
            .expect("resizing the window");
        let inner = self
            .js("return [window.innerWidth, window.innerHeight]")
            .await;
        let (w, h) = (
            inner[0].as_u64().unwrap_or(0),
            inner[1].as_u64().unwrap_or(0),
        );
        let extra = |want: u32, got: u64| want + want.saturating_sub(got as u32);
        if (w, h) != (u64::from(width), u64::from(height)) {
            self.client
                .set_window_size(extra(width, w), extra(height, h))
                .await
                .expect("resizing the window");
        }
    }

    /// Clicks the element with this id, failing the test with the id when there is none.
    pub async fn click(&self, id: &str) {
        self.client
            .find(fantoccini::Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("no element #{id}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("clicking #{id}: {e}"));
    }

    /// Runs `script` in the page and returns its result.
    pub async fn js(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("running {script:?} in the page: {e}"))
    }

    /// Waits up to `timeout` for `script` to return a truthy value, and returns it.
    pub async fn wait_for(&self, what: &str, timeout: Duration, script: &str) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script).await;
            let truthy = !matches!(&v, serde_json::Value::Null | serde_json::Value::Bool(false))
                && v != json!("")
                && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.js("return document.body.innerText").await;
                panic!("timed out after {timeout:?} waiting for {what}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Saves a screenshot as `target/screenshots/NAME.png`, and as `docs/screenshots/NAME.png`
    /// too when `MIG_UPDATE_DOCS_SCREENSHOTS` is set (so a plain test run leaves the tree clean).
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("a screenshot");
        // The workspace root: the nearest ancestor of this package that holds Cargo.lock.
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let root = manifest
            .ancestors()
            .find(|d| d.join("Cargo.lock").exists())
            .unwrap_or(&manifest)
            .to_path_buf();
        let mut dirs = vec![root.join("target/screenshots")];
        if std::env::var_os("MIG_UPDATE_DOCS_SCREENSHOTS").is_some() {
            dirs.push(root.join("docs/screenshots"));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).expect("the screenshot directory");
            let path = dir.join(format!("{name}.png"));
            std::fs::write(&path, &png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    /// Types `text` as key presses to whatever has the focus (WebDriver key codes such as
    /// `\u{e004}` for Tab work too), the way a person at the keyboard would.
    pub async fn keys(&self, text: &str) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let mut actions = KeyActions::new("keyboard".into());
        for value in text.chars() {
            actions = actions
                .then(KeyAction::Down { value })
                .then(KeyAction::Up { value });
        }
        self.client
            .perform_actions(actions)
            .await
            .unwrap_or_else(|e| panic!("typing {text:?}: {e}"));
    }

    /// The id of the focused element.
    pub async fn focused(&self) -> String {
        self.js("return document.activeElement ? document.activeElement.id : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn close(self) {
        // Ends the browser session cleanly; Drop kills whatever is left.
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
    }
}

struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            kill_group(child);
        }
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}
