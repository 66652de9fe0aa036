//! Real servers on loopback for the model-source tests and benches: an S3-compatible server
//! (`s3s-fs`, files under a root folder, bucket = sub-folder), a static file server, and one
//! that imitates the Hugging Face hub's `resolve` layout (redirect to a CDN path whose ETag is
//! the file's SHA-256, bearer-token check). Each runs on its own runtime so a test can kill it
//! mid-download (every connection drops) and start it again on the same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;

/// Access key and secret of the test S3 server.
pub const S3_KEY: (&str, &str) = ("tessera-test", "tessera-secret");

/// A server on its own runtime; dropping or [`Server::kill`] stops it and drops its connections.
pub struct Server {
    pub addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop at once: the listener closes and every open connection is dropped.
    pub fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("server runtime")
}

/// A non-blocking std listener (bound outside any runtime, so tests may start servers from async code).
fn bind(addr: SocketAddr) -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind(addr).expect("bind a loopback server");
    l.set_nonblocking(true).expect("non-blocking");
    let addr = l.local_addr().expect("local addr");
    (l, addr)
}

/// Start the S3 server over `root` on `addr` (port 0 for any), each response delayed by
/// `delay`. Buckets are the sub-folders of `root` (create them first).
pub fn s3(root: &Path, addr: SocketAddr, delay: Duration) -> Server {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;
    std::fs::create_dir_all(root).expect("s3 root");
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs over the root");
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(S3_KEY.0, S3_KEY.1));
    let service = b.build();
    let rt = runtime();
    let (std_listener, addr) = bind(addr);
    rt.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else { return };
        let http = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let svc = service.clone();
            let slow = hyper::service::service_fn(move |req| {
                let svc = svc.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    hyper::service::Service::call(&svc, req).await
                }
            });
            let conn = http.serve_connection(TokioIo::new(sock), slow).into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Server { addr, rt: Some(rt) }
}

/// Environment for `s3://` URIs against `server` (put in the process or a child's env).
pub fn s3_env(server: &Server) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", S3_KEY.0.into()),
        ("AWS_SECRET_ACCESS_KEY", S3_KEY.1.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", server.url()),
    ]
}

/// Serve `file` honouring a single `Range: bytes=a-b` (206) and HEAD, with `etag` if given.
fn file_response(method: &Method, headers: &HeaderMap, file: &Path, etag: Option<&str>) -> Response {
    file_response_with(method, headers, file, etag, true)
}

/// [`file_response`]; without `ranges`, a ranged GET gets the whole file (200) and no
/// `Accept-Ranges`, as `python3 -m http.server` and many proxies answer.
fn file_response_with(method: &Method, headers: &HeaderMap, file: &Path, etag: Option<&str>, ranges: bool) -> Response {
    let Ok(bytes) = std::fs::read(file) else {
        return Response::builder().status(StatusCode::NOT_FOUND).body(Body::from("not found")).unwrap_or_default();
    };
    let len = bytes.len() as u64;
    let range = headers
        .get(header::RANGE)
        .filter(|_| ranges)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok().map_or(len, |b| b + 1).min(len))));
    let mut r = Response::builder().header(header::ACCEPT_RANGES, if ranges { "bytes" } else { "none" });
    if let Some(e) = etag {
        r = r.header(header::ETAG, format!("\"{e}\""));
    }
    let (status, body) = match range {
        Some((a, b)) if a < b => {
            r = r.header(header::CONTENT_RANGE, format!("bytes {a}-{}/{len}", b - 1));
            (StatusCode::PARTIAL_CONTENT, bytes[a as usize..b as usize].to_vec())
        }
        Some(_) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .body(Body::empty())
                .unwrap_or_default()
        }
        None => (StatusCode::OK, bytes),
    };
    r = r.status(status).header(header::CONTENT_LENGTH, body.len());
    let body = if method == Method::HEAD { Body::empty() } else { Body::from(body) };
    r.body(body).unwrap_or_default()
}

fn serve_router(router: axum::Router, addr: SocketAddr) -> Server {
    let rt = runtime();
    let (std_listener, addr) = bind(addr);
    rt.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else { return };
        let _ = axum::serve(listener, router).await;
    });
    Server { addr, rt: Some(rt) }
}

fn safe_join(root: &Path, rel: &str) -> Option<PathBuf> {
    (!rel.split('/').any(|p| p == ".." || p.is_empty())).then(|| root.join(rel))
}

/// A static file server over `root` (no directory listings).
pub fn static_files(root: &Path) -> Server {
    static_files_with(root, true)
}

/// A static file server over `root` that ignores `Range` (answers 200 with the whole body).
pub fn static_files_without_ranges(root: &Path) -> Server {
    static_files_with(root, false)
}

fn static_files_with(root: &Path, ranges: bool) -> Server {
    let root = Arc::new(root.to_path_buf());
    let router = axum::Router::new()
        .route(
            "/{*path}",
            axum::routing::get(
                move |State(root): State<Arc<PathBuf>>,
                      UrlPath(path): UrlPath<String>,
                      method: Method,
                      headers: HeaderMap| async move {
                    match safe_join(&root, &path).filter(|p| p.is_file()) {
                        Some(p) => file_response_with(&method, &headers, &p, None, ranges),
                        None => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from("not found"))
                            .unwrap_or_default(),
                    }
                },
            ),
        )
        .with_state(root);
    serve_router(router, "127.0.0.1:0".parse().expect("addr"))
}

/// A hub imitation: `repo` at `revision` served from `dir`, as
/// `/{repo}/resolve/{revision}/{file}`; weight files redirect (302) to `/cdn/{sha256}/{file}`
/// whose ETag is the SHA-256, as the hub's LFS files do. With `token`, requests without
/// `Authorization: Bearer {token}` get 401.
pub fn hub(repo: &str, revision: &str, dir: &Path, token: Option<&str>) -> Server {
    #[derive(Clone)]
    struct Hub {
        prefix: String,
        dir: PathBuf,
        token: Option<String>,
        sha: Arc<HashMap<String, String>>,
    }
    let mut sha = HashMap::new();
    for e in std::fs::read_dir(dir).expect("hub dir").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") || name.ends_with(".gguf") {
            use sha2::Digest;
            let bytes = std::fs::read(e.path()).expect("read weight file");
            let d = sha2::Sha256::digest(&bytes);
            sha.insert(name, d.iter().map(|b| format!("{b:02x}")).collect());
        }
    }
    let hub = Hub {
        prefix: format!("{repo}/resolve/{revision}/"),
        dir: dir.to_path_buf(),
        token: token.map(str::to_string),
        sha: Arc::new(sha),
    };
    let router = axum::Router::new()
        .route(
            "/{*path}",
            axum::routing::get(
                |State(h): State<Hub>, UrlPath(path): UrlPath<String>, method: Method, headers: HeaderMap| async move {
                    let authorised = match &h.token {
                        None => true,
                        Some(t) => {
                            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
                                == Some(&format!("Bearer {t}"))
                        }
                    };
                    let not_found = |m: &str| {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from(m.to_string()))
                            .unwrap_or_default()
                    };
                    if let Some(rest) = path.strip_prefix("cdn/") {
                        let Some((digest, file)) = rest.split_once('/') else { return not_found("Entry not found") };
                        if h.sha.get(file).map(String::as_str) != Some(digest) {
                            return not_found("Entry not found");
                        }
                        return file_response(&method, &headers, &h.dir.join(file), Some(digest));
                    }
                    if !authorised {
                        return Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .body(Body::from("Invalid credentials in Authorization header"))
                            .unwrap_or_default();
                    }
                    let Some(file) = path.strip_prefix(&h.prefix) else {
                        return not_found("Repository or revision not found");
                    };
                    let Some(local) = safe_join(&h.dir, file).filter(|p| p.is_file()) else {
                        return not_found("Entry not found");
                    };
                    match h.sha.get(file) {
                        Some(d) => Response::builder()
                            .status(StatusCode::FOUND)
                            .header(header::LOCATION, format!("/cdn/{d}/{file}"))
                            .header("x-linked-etag", format!("\"{d}\""))
                            .body(Body::empty())
                            .unwrap_or_default(),
                        None => file_response(&method, &headers, &local, None),
                    }
                },
            ),
        )
        .with_state(hub);
    serve_router(router, "127.0.0.1:0".parse().expect("addr"))
}

/// Upload every file of `dir` to `server` as `s3://{bucket}/{key}/{file}` with PUT, so the
/// server keeps each object's MD5 ETag (files copied into its folder would be re-hashed on
/// every request). Runs on its own thread, so async tests may call it.
pub fn s3_upload(server: &Server, bucket: &str, key: &str, dir: &Path) {
    use object_store::{ObjectStoreExt, PutPayload};
    let (url, bucket, key, dir) = (server.url(), bucket.to_string(), key.to_string(), dir.to_path_buf());
    tessera_source::install_tls_provider();
    std::thread::spawn(move || {
        let client = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(url)
            .with_bucket_name(bucket)
            .with_access_key_id(S3_KEY.0)
            .with_secret_access_key(S3_KEY.1)
            .with_region("us-east-1")
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true).with_timeout_disabled())
            .build()
            .expect("s3 client");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        for e in std::fs::read_dir(&dir).expect("model dir").flatten() {
            if e.path().is_file() {
                let path = object_store::path::Path::from(format!("{key}/{}", e.file_name().to_string_lossy()));
                let bytes = std::fs::read(e.path()).expect("read for upload");
                rt.block_on(client.put(&path, PutPayload::from(bytes))).expect("upload");
            }
        }
    })
    .join()
    .expect("upload thread");
}
