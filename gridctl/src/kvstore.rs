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

use std::convert::Infallible;

use anyhow::Context;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!("kvstore listening on {listen}");
    serve(l, Arc::new(Mutex::new(store))).await
}

/// Serves HTTP/1.1 on `l` with hyper, which among the rest answers `Expect: 100-continue` (curl
/// sends it for every body over 1 KiB and waits a second for it).
pub async fn serve(l: TcpListener, store: Arc<Mutex<Store>>) -> anyhow::Result<()> {
    loop {
        let (s, _) = l.accept().await?;
        let st = store.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(route(req, st).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await
            {
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

type Resp = Response<Full<Bytes>>;

async fn route(req: Request<Incoming>, store: Arc<Mutex<Store>>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return respond(200, "ok\n");
    }
    if path == "/" && method == Method::GET {
        let page = guestbook_page(&store.lock().unwrap().guestbook());
        return respond_with(200, &[("Content-Type", "text/html; charset=utf-8")], page);
    }
    if path == "/guestbook" && method == Method::POST {
        let body = match body(req).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let entry: String = form_urlencoded::parse(&body)
            .find(|(k, _)| k == "entry")
            .map(|(_, v)| v.trim().chars().filter(|c| !c.is_control()).collect())
            .unwrap_or_default();
        if entry.is_empty() || entry.len() > MAX_ENTRY {
            return respond(400, "write an entry of 1 to 2000 bytes\n");
        }
        return match write(store, move |st| {
            let key = st.next_guestbook_key();
            st.put(&key, entry.as_bytes())
        })
        .await
        {
            Ok(()) => respond_with(303, &[("Location", "/")], ""),
            Err(e) => respond(507, format!("{e}\n")),
        };
    }
    let Some(key) = path.strip_prefix("/kv/").filter(|k| valid_key(k)) else {
        return respond(404, "use /kv/KEY (KEY: 1-256 of A-Z a-z 0-9 . _ -)\n");
    };
    let key = key.to_string();
    match method {
        Method::GET => match store.lock().unwrap().get(&key) {
            Some(v) => respond(200, v.to_vec()),
            None => respond(404, "no such key\n"),
        },
        Method::PUT => {
            let body = match body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match write(store, move |st| st.put(&key, &body)).await {
                Ok(()) => respond(204, ""),
                Err(e) => respond(507, format!("{e}\n")),
            }
        }
        _ => respond(405, "use GET or PUT\n"),
    }
}

/// The request's body, at most [`MAX_VALUE`] bytes; a larger one is refused before it is read
/// when it declares its length (so no `100 Continue` invites it).
async fn body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    let too_large = || respond(413, "value larger than 16 MiB\n");
    if req.body().size_hint().lower() > MAX_VALUE as u64 {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_VALUE).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(respond(400, format!("reading the body: {e}\n"))),
    }
}

/// Runs a write on the blocking pool: it fsyncs before the answer.
async fn write(
    store: Arc<Mutex<Store>>,
    f: impl FnOnce(&mut Store) -> std::io::Result<()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || f(&mut store.lock().unwrap()))
        .await
        .map_err(std::io::Error::other)?
}

fn respond(code: u16, body: impl Into<Bytes>) -> Resp {
    respond_with(code, &[], body)
}

fn respond_with(code: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    let mut b = Response::builder().status(code);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into()))
        .expect("status codes and headers here are constants")
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

    /// A store on a fresh volume served on an ephemeral loopback port.
    async fn server() -> (std::net::SocketAddr, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data");
        crate::volume::create(&p, crate::template::VolumeKind::File, 1 << 20, None).unwrap();
        let store = Arc::new(Mutex::new(Store::open(&p).unwrap()));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, store));
        (addr, d)
    }

    async fn read_head(s: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed after {head:?}");
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    #[tokio::test]
    async fn a_put_that_expects_100_continue_is_invited_at_once() {
        use tokio::io::AsyncWriteExt;
        let (addr, _d) = server().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let value = vec![b'v'; 4096];
        s.write_all(
            format!(
                "PUT /kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
                 Expect: 100-continue\r\n\r\n",
                value.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // The hand-written server never sent this: curl waited a second before every body.
        let interim = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut s))
            .await
            .expect("no 100 Continue");
        assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
        s.write_all(&value).await.unwrap();
        assert!(read_head(&mut s).await.starts_with("HTTP/1.1 204"));
        let (code, body) = get(addr, "/kv/big").await;
        assert_eq!((code, body.len()), (200, 4096));
    }

    #[tokio::test]
    async fn a_declared_oversize_body_is_refused_without_reading_it() {
        use tokio::io::AsyncWriteExt;
        let (addr, _d) = server().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!(
                "PUT /kv/huge HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
                 Expect: 100-continue\r\n\r\n",
                MAX_VALUE + 1
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
        assert_eq!(get(addr, "/kv/huge").await.0, 404);
    }

    #[tokio::test]
    async fn bad_keys_and_methods_get_a_message_that_says_what_to_use() {
        let (addr, _d) = server().await;
        let (code, body) = get(addr, "/kv/a%20b").await;
        assert_eq!(code, 404);
        assert!(String::from_utf8_lossy(&body).contains("use /kv/KEY"));
        assert_eq!(get(addr, "/healthz").await, (200, b"ok\n".to_vec()));
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.unwrap();
        let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let code = String::from_utf8_lossy(&resp[9..12]).parse().unwrap();
        (code, resp[end + 4..].to_vec())
    }
}
