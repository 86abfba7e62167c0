//! `gridctl kvstore --listen IP:PORT --data FILE`: the component of the built-in `kvstore`
//! template. A tiny HTTP server (`PUT /kv/KEY`, `GET /kv/KEY`, `GET /healthz`) that appends each
//! value to its data volume and fsyncs before answering, so what was acknowledged survives a stop,
//! a crash and a migration. `GET /` is a guestbook page over the same store (`POST /guestbook`
//! adds an entry), so a person can see with a browser that the data moved with the application.
//!
//! Volume format: records `klen:u32 vlen:u32 key value` (little-endian) from offset 0; a record
//! with `klen = 0` (the zeros of a fresh sparse volume) ends the log; the last record of a key wins.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_VALUE: usize = 16 << 20;

/// Key prefix of the guestbook's entries.
const GUESTBOOK: &str = "guestbook-";
/// The longest guestbook entry kept, in bytes.
const MAX_ENTRY: usize = 2000;

pub struct Store {
    file: File,
    end: u64,
    cap: u64,
    map: HashMap<String, Vec<u8>>,
}

impl Store {
    pub fn open(path: &Path) -> std::io::Result<Store> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let cap = file.metadata()?.len();
        let mut map = HashMap::new();
        let mut end = 0u64;
        loop {
            let mut h = [0u8; 8];
            if end + 8 > cap || file.read_exact_at(&mut h, end).is_err() {
                break;
            }
            let kl = u32::from_le_bytes(h[..4].try_into().unwrap()) as u64;
            let vl = u32::from_le_bytes(h[4..].try_into().unwrap()) as u64;
            if kl == 0 || end + 8 + kl + vl > cap {
                break;
            }
            let mut kv = vec![0u8; (kl + vl) as usize];
            file.read_exact_at(&mut kv, end + 8)?;
            let v = kv.split_off(kl as usize);
            map.insert(String::from_utf8_lossy(&kv).into_owned(), v);
            end += 8 + kl + vl;
        }
        Ok(Store {
            file,
            end,
            cap,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// The guestbook's entries, oldest first.
    pub fn guestbook(&self) -> Vec<String> {
        let mut keys: Vec<&String> = self
            .map
            .keys()
            .filter(|k| k.starts_with(GUESTBOOK))
            .collect();
        keys.sort();
        keys.iter()
            .map(|k| String::from_utf8_lossy(&self.map[*k]).into_owned())
            .collect()
    }

    /// The key the next guestbook entry gets: numbered, so they sort in the order they came.
    fn next_guestbook_key(&self) -> String {
        let n = self.map.keys().filter(|k| k.starts_with(GUESTBOOK)).count();
        format!("{GUESTBOOK}{:08}", n + 1)
    }

    pub fn put(&mut self, key: &str, value: &[u8]) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(8 + key.len() + value.len());
        rec.extend_from_slice(&(key.len() as u32).to_le_bytes());
        rec.extend_from_slice(&(value.len() as u32).to_le_bytes());
        rec.extend_from_slice(key.as_bytes());
        rec.extend_from_slice(value);
        if self.end + rec.len() as u64 + 8 > self.cap {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "the data volume is full",
            ));
        }
        self.file.write_all_at(&rec, self.end)?;
        self.file.sync_data()?;
        self.end += rec.len() as u64;
        self.map.insert(key.to_string(), value.to_vec());
        Ok(())
    }
}

pub async fn run(listen: &str, data: &Path) -> anyhow::Result<()> {
    let store = Store::open(data).with_context(|| format!("opening {}", data.display()))?;
    let store = Arc::new(Mutex::new(store));
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!("kvstore listening on {listen}");
    loop {
        let (s, _) = l.accept().await?;
        let st = store.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(s, st).await {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

fn valid_key(k: &str) -> bool {
    (1..=256).contains(&k.len())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

async fn serve(mut s: TcpStream, store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16384 {
            return respond(&mut s, 431, b"headers too large\n").await;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut rl = lines.next().unwrap_or("").split(' ');
    let (method, path) = (rl.next().unwrap_or(""), rl.next().unwrap_or(""));
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    if len > MAX_VALUE {
        return respond(&mut s, 413, b"value larger than 16 MiB\n").await;
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; (len - body.len()).min(1 << 16)];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    if path == "/healthz" {
        return respond(&mut s, 200, b"ok\n").await;
    }
    if path == "/" && method == "GET" {
        let page = guestbook_page(&store.lock().unwrap().guestbook());
        return respond_with(
            &mut s,
            200,
            &[("Content-Type", "text/html; charset=utf-8")],
            page.as_bytes(),
        )
        .await;
    }
    if path == "/guestbook" && method == "POST" {
        let entry: String = form_urlencoded::parse(&body)
            .find(|(k, _)| k == "entry")
            .map(|(_, v)| v.trim().chars().filter(|c| !c.is_control()).collect())
            .unwrap_or_default();
        if entry.is_empty() || entry.len() > MAX_ENTRY {
            return respond(&mut s, 400, b"write an entry of 1 to 2000 bytes\n").await;
        }
        let st = store.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut st = st.lock().unwrap();
            let key = st.next_guestbook_key();
            st.put(&key, entry.as_bytes())
        })
        .await
        .map_err(std::io::Error::other)?;
        return match r {
            Ok(()) => respond_with(&mut s, 303, &[("Location", "/")], b"").await,
            Err(e) => respond(&mut s, 507, format!("{e}\n").as_bytes()).await,
        };
    }
    let Some(key) = path.strip_prefix("/kv/").filter(|k| valid_key(k)) else {
        return respond(
            &mut s,
            404,
            b"use /kv/KEY (KEY: 1-256 of A-Z a-z 0-9 . _ -)\n",
        )
        .await;
    };
    match method {
        "GET" => {
            let v = store.lock().unwrap().get(key).map(<[u8]>::to_vec);
            match v {
                Some(v) => respond(&mut s, 200, &v).await,
                None => respond(&mut s, 404, b"no such key\n").await,
            }
        }
        "PUT" => {
            let key = key.to_string();
            let st = store.clone();
            let r = tokio::task::spawn_blocking(move || st.lock().unwrap().put(&key, &body))
                .await
                .map_err(std::io::Error::other)?;
            match r {
                Ok(()) => respond(&mut s, 204, b"").await,
                Err(e) => respond(&mut s, 507, format!("{e}\n").as_bytes()).await,
            }
        }
        _ => respond(&mut s, 405, b"use GET or PUT\n").await,
    }
}

async fn respond(s: &mut TcpStream, code: u16, body: &[u8]) -> std::io::Result<()> {
    respond_with(s, code, &[], body).await
}

async fn respond_with(
    s: &mut TcpStream,
    code: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        204 => "No Content",
        303 => "See Other",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Insufficient Storage",
    };
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.shutdown().await
}

/// Escapes text for HTML. Written by hand: five replacements do not justify a templating crate.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn guestbook_page(entries: &[String]) -> String {
    let items: String = if entries.is_empty() {
        "<li class=\"empty\">No entries yet.</li>".into()
    } else {
        entries
            .iter()
            .map(|e| format!("<li>{}</li>\n", escape(e)))
            .collect()
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Guestbook</title><style>body{{font:16px system-ui,sans-serif;max-width:40rem;\
         margin:2rem auto;padding:0 1rem}}li{{margin:.4rem 0}}.empty{{color:#666}}</style></head>\n\
         <body><h1>Guestbook</h1><p>Every entry is stored on this application's data volume, so it \
         moves with the application.</p>\n<ol id=\"entries\">{items}</ol>\n\
         <form method=\"post\" action=\"/guestbook\"><label for=\"entry\">Your entry</label> \
         <input id=\"entry\" name=\"entry\" maxlength=\"2000\" required> \
         <button type=\"submit\">Sign</button></form></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guestbook_entries_keep_their_order_and_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let mut st = Store::open(&p).unwrap();
        for e in ["first", "<b>second</b>", "third"] {
            let k = st.next_guestbook_key();
            st.put(&k, e.as_bytes()).unwrap();
        }
        st.put("other", b"not an entry").unwrap();
        let st = Store::open(&p).unwrap();
        assert_eq!(st.guestbook(), ["first", "<b>second</b>", "third"]);
        let page = guestbook_page(&st.guestbook());
        assert!(
            page.contains("<li>&lt;b&gt;second&lt;/b&gt;</li>"),
            "{page}"
        );
        assert!(!page.contains("not an entry"));
    }

    #[test]
    fn values_survive_reopening_and_the_last_write_wins() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        crate::volume::create(&p, crate::template::VolumeKind::File, 1 << 20, None).unwrap();
        let mut s = Store::open(&p).unwrap();
        s.put("a", b"1").unwrap();
        s.put("b", b"two").unwrap();
        s.put("a", b"3").unwrap();
        let s = Store::open(&p).unwrap();
        assert_eq!(s.get("a"), Some(&b"3"[..]));
        assert_eq!(s.get("b"), Some(&b"two"[..]));
        assert_eq!(s.get("c"), None);
    }

    #[test]
    fn a_full_volume_is_an_error_not_a_corruption() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        crate::volume::create(&p, crate::template::VolumeKind::File, 64, None).unwrap();
        let mut s = Store::open(&p).unwrap();
        assert!(s.put("k", &[1u8; 100]).is_err());
        s.put("k", b"small").unwrap();
        assert_eq!(Store::open(&p).unwrap().get("k"), Some(&b"small"[..]));
    }
}
