//! A hostile homeserver: an HTTP (or HTTPS) proxy in front of the real Synapse whose
//! handler sees every request (method, path, access token, body, how many came before)
//! and decides: forward it, rewrite the answer, answer itself, stream an endless answer,
//! deliver slowly, or stall. The handler may also act on Synapse on the server's behalf
//! (change a device's keys between two requests, say), which is what a malicious server
//! can do.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// A request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Below `/_matrix/client/v3` (e.g. `/keys/query`), with the query string.
    pub path: String,
    pub token: Option<String>,
    pub body: Option<Value>,
    /// How many requests with this method and path (without query) came before this one.
    pub seen: usize,
}

impl Req {
    pub fn is(&self, method: &str, prefix: &str) -> bool {
        self.method == method && self.path.starts_with(prefix)
    }
}

pub type Rewrite = Box<dyn FnOnce(&mut u16, &mut Value) + Send>;
pub type Producer = Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + Send>;

/// What the proxy does with a request.
pub enum Reply {
    /// Forward it and return Synapse's answer unchanged.
    Forward,
    /// Forward it and change the JSON answer.
    Rewrite(Rewrite),
    /// Answer without asking Synapse.
    Json(u16, Value),
    /// Answer 200 with a body written by the producer (chunked: any size, never in memory).
    Stream(Producer),
    /// Forward, and deliver the answer at this many bytes per second.
    Throttle(usize),
    /// Forward, send the headers and this many bytes of the answer, then nothing more.
    Stall(usize),
}

pub type Handler = dyn Fn(&Req) -> Reply + Send + Sync;

/// Something that carries HTTP for the proxy: plain TCP or TLS.
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A running hostile server.
pub struct Hostile {
    pub url: String,
    /// (method, path) of every request, in order.
    pub log: Arc<Mutex<Vec<(String, String)>>>,
}

impl Hostile {
    /// Plain HTTP on 127.0.0.1 in front of `target` (a Synapse URL).
    pub fn start(target: &str, handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Hostile {
        Self::start_with(target, Arc::new(handler), None)
    }

    /// HTTPS with `tls` (a rustls server configuration), on `localhost`.
    pub fn start_tls(
        target: &str,
        tls: Arc<rustls::ServerConfig>,
        handler: impl Fn(&Req) -> Reply + Send + Sync + 'static,
    ) -> Hostile {
        Self::start_with(target, Arc::new(handler), Some(tls))
    }

    fn start_with(
        target: &str,
        handler: Arc<Handler>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let log = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let target = target.to_string();
        let state = (log.clone(), counts);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (target, handler, tls, state) =
                    (target.clone(), handler.clone(), tls.clone(), state.clone());
                std::thread::spawn(move || {
                    let conn: Box<dyn Conn> = match tls {
                        None => Box::new(stream),
                        Some(cfg) => match rustls::ServerConnection::new(cfg) {
                            Ok(c) => Box::new(rustls::StreamOwned::new(c, stream)),
                            Err(_) => return,
                        },
                    };
                    let _ = serve(conn, &target, &*handler, &state.0, &state.1);
                });
            }
        });
        Hostile { url, log }
    }

    /// How many requests `method path…` the proxy saw.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, p)| m == method && p.starts_with(prefix))
            .count()
    }
}

/// Synapse's answer to a forwarded request: (status, body bytes).
fn forward(target: &str, req: &Req) -> (u16, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let url = format!("{target}/_matrix/client/v3{}", req.path);
    let auth = req.token.as_ref().map(|t| format!("Bearer {t}"));
    let resp = match req.method.as_str() {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        m => {
            let mut r = match m {
                "PUT" => agent.put(&url),
                "DELETE" => agent.delete(&url).force_send_body(),
                _ => agent.post(&url),
            };
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send_json(req.body.clone().unwrap_or(serde_json::json!({})))
        }
    };
    match resp {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let body = r
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_vec()
                .unwrap_or_default();
            (status, body)
        }
        Err(e) => (
            502,
            format!("{{\"errcode\":\"M_UNKNOWN\",\"error\":\"{e}\"}}").into_bytes(),
        ),
    }
}

fn serve(
    conn: Box<dyn Conn>,
    target: &str,
    handler: &Handler,
    log: &Mutex<Vec<(String, String)>>,
    counts: &Mutex<HashMap<String, usize>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("GET").to_string();
        let full = parts.next().unwrap_or("/").to_string();
        let mut token = None;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.to_ascii_lowercase().as_str() {
                "authorization" => {
                    token = v.trim().strip_prefix("Bearer ").map(str::to_string);
                }
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let path = full
            .strip_prefix("/_matrix/client/v3")
            .unwrap_or(&full)
            .to_string();
        let key = format!("{method} {}", path.split('?').next().unwrap_or(&path));
        let seen = {
            let mut c = counts.lock().unwrap();
            let n = c.entry(key).or_insert(0);
            *n += 1;
            *n - 1
        };
        log.lock().unwrap().push((method.clone(), path.clone()));
        let req = Req {
            method,
            path,
            token,
            body: serde_json::from_slice(&body).ok(),
            seen,
        };
        let w = reader.get_mut();
        match handler(&req) {
            Reply::Forward => {
                let (status, body) = forward(target, &req);
                respond(w, status, &body, None)?;
            }
            Reply::Rewrite(f) => {
                let (mut status, body) = forward(target, &req);
                let mut v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                f(&mut status, &mut v);
                respond(w, status, v.to_string().as_bytes(), None)?;
            }
            Reply::Json(status, v) => respond(w, status, v.to_string().as_bytes(), None)?,
            Reply::Throttle(rate) => {
                let (status, body) = forward(target, &req);
                respond(w, status, &body, Some(rate))?;
            }
            Reply::Stall(after) => {
                let (status, body) = forward(target, &req);
                head(w, status, body.len())?;
                w.write_all(&body[..after.min(body.len())])?;
                w.flush()?;
                std::thread::sleep(Duration::from_secs(600));
                return Ok(());
            }
            Reply::Stream(produce) => {
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                )?;
                let mut chunked = Chunked(w);
                // The client may hang up once it has seen enough: that ends the stream.
                let _ = produce(&mut chunked);
                let _ = chunked.0.write_all(b"0\r\n\r\n");
                let _ = chunked.0.flush();
                return Ok(());
            }
        }
    }
}

/// The status line and headers of an answer of `len` bytes.
fn head(w: &mut dyn Write, status: u16, len: usize) -> std::io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

fn respond(
    w: &mut dyn Write,
    status: u16,
    body: &[u8],
    rate: Option<usize>,
) -> std::io::Result<()> {
    head(w, status, body.len())?;
    match rate {
        None => w.write_all(body)?,
        Some(rate) => {
            // Ten slices a second.
            let slice = (rate / 10).max(1);
            for chunk in body.chunks(slice) {
                w.write_all(chunk)?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    w.flush()
}

/// Writes HTTP/1.1 chunked transfer encoding.
struct Chunked<'a>(&'a mut dyn Write);

impl Write for Chunked<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A private certificate authority and a certificate for `localhost` it signed, made with
/// the `openssl` command in `dir`: (CA certificate file, rustls server configuration).
pub fn private_ca(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mxhsm test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    (dir.join("ca.pem"), Arc::new(config))
}
