//! Tiny HTTP(S) server for harness tests (mapped from image `test/http`).
//!
//! `im-test-http --listen ADDR [--tls-cert FILE --tls-key FILE] [--ready-file FILE]`
//! - `GET /healthz` → 200
//! - `GET /readyz`  → 200, or 503 when `--ready-file` is given and that file is missing
//! - `GET /env/NAME` → the value of env var NAME (404 if unset)
//! - `GET /file?PATH` → contents of PATH
//! - `GET /write?PATH` → appends 64 KiB of zeros to PATH: 200, or 507 with the error (ENOSPC)
//! - `GET /hostname` → the kernel's hostname (the pod's UTS namespace)
//! - `GET /fetch?HOST:PORT/PATH` → the body of `GET /PATH` over plain HTTP from HOST:PORT, the
//!   name resolved here (the pod's /etc/hosts), 502 with the error when that fails
//! - anything else → `hello from <HOSTNAME>`
//!
//! Exits 0 on SIGTERM (after printing "terminating"), so graceful deletion is observable.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn respond(req_line: &str, ready_file: &Option<String>) -> (u16, String) {
    let path = req_line.split_whitespace().nth(1).unwrap_or("/");
    match path {
        "/healthz" => (200, "ok".into()),
        "/readyz" => match ready_file {
            Some(f) if !std::path::Path::new(f).exists() => (503, "not ready".into()),
            _ => (200, "ready".into()),
        },
        p if p.starts_with("/env/") => match std::env::var(&p[5..]) {
            Ok(v) => (200, v),
            Err(_) => (404, "unset".into()),
        },
        p if p.starts_with("/file?") => match std::fs::read_to_string(&p[6..]) {
            Ok(v) => (200, v),
            Err(e) => (404, e.to_string()),
        },
        "/hostname" => (200, hostname()),
        p if p.starts_with("/write?") => {
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p[7..])?;
                f.write_all(&[0u8; 64 * 1024])?;
                f.sync_all()
            };
            match write() {
                Ok(()) => (200, "written".into()),
                Err(e) => (507, e.to_string()),
            }
        }
        p if p.starts_with("/fetch?") => match fetch(&p[7..]) {
            Ok(v) => (200, v),
            Err(e) => (502, e),
        },
        _ => (
            200,
            format!(
                "hello from {}",
                std::env::var("HOSTNAME").unwrap_or_default()
            ),
        ),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `HOST:PORT/PATH` → the response body (status line checked).
fn fetch(target: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    let (authority, path) = target.split_once('/').unwrap_or((target, ""));
    let addrs: Vec<_> = authority
        .to_socket_addrs()
        .map_err(|e| format!("resolve {authority}: {e}"))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(addr, std::time::Duration::from_secs(3))
        .map_err(|e| format!("connect {authority} ({addr}): {e}"))?;
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send to {authority}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read from {authority}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{authority} sent no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{authority}: {}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_string())
}

fn handle<S: Read + Write>(stream: S, ready_file: &Option<String>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Drain headers.
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let (code, body) = respond(&line, ready_file);
    let resp = format!(
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = reader.get_mut().write_all(resp.as_bytes());
    let _ = reader.get_mut().flush();
}

fn tls_config(cert: &str, key: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        std::fs::File::open(cert).map_err(|e| format!("{cert}: {e}"))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| e.to_string())?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        std::fs::File::open(key).map_err(|e| format!("{key}: {e}"))?,
    ))
    .map_err(|e| e.to_string())?
    .ok_or("no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen").unwrap_or_else(|| "0.0.0.0:8080".into());
    let ready_file = arg(&args, "--ready-file");
    let tls = match (arg(&args, "--tls-cert"), arg(&args, "--tls-key")) {
        (Some(c), Some(k)) => match tls_config(&c, &k) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("im-test-http: tls: {e}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("im-test-http: bind {listen}: {e}");
            std::process::exit(1);
        }
    };
    listener.set_nonblocking(true).ok();
    println!(
        "im-test-http listening on {listen} (tls: {})",
        tls.is_some()
    );
    loop {
        if TERM.load(Ordering::SeqCst) {
            println!("terminating");
            std::process::exit(0);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).ok();
                let ready_file = ready_file.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    Some(cfg) => {
                        if let Ok(conn) = rustls::ServerConnection::new(cfg) {
                            handle(rustls::StreamOwned::new(conn, stream), &ready_file);
                        }
                    }
                    None => handle(stream, &ready_file),
                });
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
