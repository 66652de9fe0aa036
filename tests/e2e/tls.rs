//! HTTPS: `--ssl-certfile/--ssl-keyfile` serve TLS, and `--enable-ssl-refresh` picks up a
//! rotated certificate without a restart. Certificates come from the system's `openssl`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_tests::{serve_args, smollm2_gguf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package `openssl`) is needed to make test certificates");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh CA (`<name>-ca.crt`) and a server certificate for 127.0.0.1 signed by it, written
/// as `tls.crt`/`tls.key` by rename (key first), as a rotation would.
fn make_cert(dir: &Path, name: &str) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = format!("{name}-ca");
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    let mut a = vec!["req", "-x509", "-days", "2", "-subj", "/CN=tessera test CA", "-keyout", &ca_key, "-out", &ca_crt];
    a.extend(ec);
    openssl(&a, dir);
    let mut a = vec!["req", "-new", "-subj", "/CN=127.0.0.1", "-keyout", "tls.key.new", "-out", "tls.csr"];
    a.extend(ec);
    openssl(&a, dir);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "tls.crt.new",
        ],
        dir,
    );
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

/// GET `path` over TLS trusting only `ca`; the status line, or the TLS error.
async fn get(port: u16, ca: &Path, path: &str) -> Result<String, String> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut resp = String::new();
    tls.read_to_string(&mut resp).await.map_err(|e| e.to_string())?;
    Ok(resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_and_reloads_a_rotated_certificate() {
    let dir = std::env::temp_dir().join(format!("tessera-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_cert(&dir, "first");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let args = serve_args(
        &smollm2_gguf(),
        &["--ssl-certfile", cert.to_str().unwrap(), "--ssl-keyfile", key.to_str().unwrap(), "--enable-ssl-refresh"],
    );
    let running = tessera::launch(args).await.expect("worker starts with TLS");
    let port = running.addr.port();

    let resp = get(port, &dir.join("first-ca.crt"), "/v1/models").await.expect("HTTPS request");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("smollm2"), "{resp}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/health")).send().await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200), "plain HTTP must not be served");

    make_cert(&dir, "second");
    let t = Instant::now();
    loop {
        // Trusting only the new certificate succeeds once it has been reloaded.
        match get(port, &dir.join("second-ca.crt"), "/health").await {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break,
            other => assert!(t.elapsed() < Duration::from_secs(15), "rotated certificate never served: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let old = get(port, &dir.join("first-ca.crt"), "/health").await;
    assert!(old.is_err(), "the old certificate is no longer served: {old:?}");
    running.stop().await.expect("stop");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_flags_are_start_up_errors() {
    let missing = serve_args(&smollm2_gguf(), &["--ssl-certfile", "/nonexistent/tls.crt", "--ssl-keyfile", "/x"]);
    let e = tessera::launch(missing).await.err().expect("refused").to_string();
    assert!(e.contains("--ssl-certfile /nonexistent/tls.crt"), "{e}");
    let half = serve_args(&smollm2_gguf(), &["--ssl-certfile", "/nonexistent/tls.crt"]);
    let e = tessera::launch(half).await.err().expect("refused").to_string();
    assert!(e.contains("go together"), "{e}");
}
