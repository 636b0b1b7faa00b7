//! HTTP(S) GET and TCP probes, made from inside the node's network namespace as a kubelet on
//! that node would (so a cut node link does not fail the probes of processes that still run).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects to `addr` from inside the network namespace at `netns`.
///
/// A socket keeps the namespace it was created in, so a short-lived thread enters the namespace
/// (setns affects only the calling thread), connects, and hands the socket back.
pub async fn connect_in_netns(
    netns: &Path,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let netns: PathBuf = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = std::fs::File::open(&netns)?;
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; affects only this thread, which ends below.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })();
        let _ = tx.send(result);
    });
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("probe thread vanished"))??;
    TcpStream::from_std(stream)
}

/// Accepts any server certificate: kubelet does not verify certificates of HTTPS probes.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn insecure_tls() -> Result<tokio_rustls::TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn get_status<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", line.lines().next()))?;
    Ok(code)
}

/// What to probe.
#[derive(Debug, Clone)]
pub enum Probe {
    Http {
        addr: SocketAddr,
        https: bool,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        addr: SocketAddr,
    },
    /// A probe kind the harness does not run (exec, grpc): always fails, with this reason.
    Unsupported(String),
}

/// Runs one probe; Ok on success, Err with the reason otherwise.
pub async fn run(netns: &Path, probe: &Probe, timeout: Duration) -> Result<(), String> {
    let fut = async {
        match probe {
            Probe::Unsupported(why) => Err(why.clone()),
            Probe::Tcp { addr } => connect_in_netns(netns, *addr, timeout)
                .await
                .map(|_| ())
                .map_err(|e| format!("tcp connect {addr}: {e}")),
            Probe::Http {
                addr,
                https,
                path,
                headers,
            } => {
                let stream = connect_in_netns(netns, *addr, timeout)
                    .await
                    .map_err(|e| format!("connect {addr}: {e}"))?;
                let host = addr.to_string();
                let code = if *https {
                    let tls = insecure_tls()?;
                    let name = ServerName::IpAddress(addr.ip().into());
                    let stream = tls
                        .connect(name, stream)
                        .await
                        .map_err(|e| format!("tls handshake: {e}"))?;
                    get_status(stream, &host, path, headers).await?
                } else {
                    get_status(stream, &host, path, headers).await?
                };
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}
