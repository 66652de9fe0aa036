//! Model URIs: what `spec.model.uri` (or the `MODEL` argument) may name, parsed without I/O.

use std::path::PathBuf;

use crate::{Result, SourceError};

/// Where the model lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelUri {
    /// A local directory or file (`/mnt/models`, `./m`, `file:///m`).
    Local(PathBuf),
    /// An object store or web server.
    Remote(RemoteUri),
}

/// A remote model: the store, the folder (or single file) inside it, and its cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUri {
    /// The URI as given, for messages.
    pub uri: String,
    pub store: StoreKind,
    /// The folder inside the store (no leading or trailing `/`), or the folder of `file`.
    pub prefix: String,
    /// A single file the URI names (a `.gguf`), relative to `prefix`.
    pub file: Option<String>,
    /// Folder inside the cache directory for this URI (and revision).
    pub cache_key: PathBuf,
}

/// Which store a remote URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    S3 {
        bucket: String,
    },
    Gcs {
        bucket: String,
    },
    /// `az://container/…` or `abfs[s]://container@account.dfs.core.windows.net/…`.
    Azure {
        url: String,
    },
    /// `http(s)://host/folder`: no listing, files are found by their known names.
    Http {
        base: String,
    },
    /// `hf://org/model[@revision]`: the hub's `resolve` layout under `HF_ENDPOINT`.
    Hf {
        repo: String,
        revision: String,
    },
}

impl RemoteUri {
    /// Whether the store can list a folder (object stores can; web servers and the hub here cannot).
    pub fn can_list(&self) -> bool {
        matches!(self.store, StoreKind::S3 { .. } | StoreKind::Gcs { .. } | StoreKind::Azure { .. })
    }
}

fn bad(uri: &str, why: impl Into<String>) -> SourceError {
    SourceError::Uri { uri: uri.into(), why: why.into() }
}

/// Keep a path component safe as a cache folder name.
fn clean(part: &str) -> String {
    let s: String =
        part.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "_".into()
    } else {
        s
    }
}

fn key(parts: &[&str]) -> PathBuf {
    parts.iter().flat_map(|p| p.split('/')).filter(|p| !p.is_empty()).map(clean).collect()
}

/// Split `folder/…/name.gguf` into (folder, Some(name)); anything else is a folder.
fn folder_and_file(path: &str) -> (String, Option<String>) {
    let path = path.trim_matches('/');
    if path.ends_with(".gguf") {
        match path.rsplit_once('/') {
            Some((dir, f)) => (dir.to_string(), Some(f.to_string())),
            None => (String::new(), Some(path.to_string())),
        }
    } else {
        (path.to_string(), None)
    }
}

/// Parse a model URI.
pub fn parse(uri: &str) -> Result<ModelUri> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(ModelUri::Local(PathBuf::from(uri)));
    };
    let remote = |store, path: &str, key_parts: &[&str]| {
        let (prefix, file) = folder_and_file(path);
        ModelUri::Remote(RemoteUri { uri: uri.to_string(), store, prefix, file, cache_key: key(key_parts) })
    };
    let bucket_and_path = |rest: &str| -> Result<(String, String)> {
        let (b, p) = rest.split_once('/').unwrap_or((rest, ""));
        if b.is_empty() {
            return Err(bad(uri, "the bucket name is empty"));
        }
        Ok((b.to_string(), p.to_string()))
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" => Ok(ModelUri::Local(PathBuf::from(rest))),
        "s3" | "s3a" => {
            let (bucket, path) = bucket_and_path(rest)?;
            Ok(remote(StoreKind::S3 { bucket: bucket.clone() }, &path, &["s3", &bucket, &path]))
        }
        "gs" => {
            let (bucket, path) = bucket_and_path(rest)?;
            Ok(remote(StoreKind::Gcs { bucket: bucket.clone() }, &path, &["gs", &bucket, &path]))
        }
        "az" | "abfs" | "abfss" => {
            let (container, path) = bucket_and_path(rest)?;
            let url = format!("{scheme}://{container}");
            Ok(remote(StoreKind::Azure { url }, &path, &["az", &container, &path]))
        }
        "http" | "https" => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad(uri, "no host"));
            }
            let (prefix, file) = folder_and_file(path);
            let base = format!("{scheme}://{host}/{prefix}");
            let k = key(&[scheme, host, path]);
            Ok(ModelUri::Remote(RemoteUri {
                uri: uri.to_string(),
                store: StoreKind::Http { base: base.trim_end_matches('/').to_string() },
                prefix: String::new(),
                file,
                cache_key: k,
            }))
        }
        "hf" => {
            let rest = rest.trim_matches('/');
            let mut parts = rest.splitn(3, '/');
            let (org, model, file) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
            let (model, revision) = match model.split_once(['@', ':']) {
                Some((m, r)) => (m, r),
                None => (model, "main"),
            };
            if org.is_empty() || model.is_empty() || revision.is_empty() {
                return Err(bad(uri, "expected hf://org/model[@revision][/file.gguf]"));
            }
            let repo = format!("{org}/{model}");
            let file = match file {
                Some(f) if f.split('/').any(|p| p.is_empty() || p == "." || p == "..") => {
                    return Err(bad(uri, format!("`{f}`: a file path may not contain empty, `.` or `..` parts")))
                }
                Some(f) if f.ends_with(".gguf") => Some(f.to_string()),
                Some(f) => return Err(bad(uri, format!("`{f}`: only a .gguf file may follow the repository"))),
                None => None,
            };
            Ok(ModelUri::Remote(RemoteUri {
                uri: uri.to_string(),
                store: StoreKind::Hf { repo: repo.clone(), revision: revision.to_string() },
                prefix: String::new(),
                file,
                cache_key: key(&["hf", &repo, revision]),
            }))
        }
        "pvc" => Err(bad(uri, "a PVC is mounted by the operator; pass the mounted path (e.g. /mnt/models)")),
        other => {
            Err(bad(uri, format!("unknown scheme `{other}` (use a path, file, s3, gs, az, abfs, http, https or hf)")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(uri: &str) -> RemoteUri {
        match parse(uri) {
            Ok(ModelUri::Remote(r)) => r,
            other => panic!("{uri}: {other:?}"),
        }
    }

    #[test]
    fn uris_parse_into_store_prefix_file_and_cache_key() {
        assert_eq!(parse("/mnt/models").ok(), Some(ModelUri::Local("/mnt/models".into())));
        assert_eq!(parse("file:///mnt/m").ok(), Some(ModelUri::Local("/mnt/m".into())));
        let s3 = remote("s3://bucket/models/smol/");
        assert_eq!(s3.store, StoreKind::S3 { bucket: "bucket".into() });
        assert_eq!((s3.prefix.as_str(), s3.file.as_deref()), ("models/smol", None));
        assert_eq!(s3.cache_key, PathBuf::from("s3/bucket/models/smol"));
        let g = remote("gs://b/x/model.gguf");
        assert_eq!((g.prefix.as_str(), g.file.as_deref()), ("x", Some("model.gguf")));
        let h = remote("http://127.0.0.1:8080/m/smol");
        assert_eq!(h.store, StoreKind::Http { base: "http://127.0.0.1:8080/m/smol".into() });
        assert_eq!(h.cache_key, PathBuf::from("http/127.0.0.1_8080/m/smol"));
        let hf = remote("hf://HuggingFaceTB/SmolLM2-135M@v1.0");
        assert_eq!(hf.store, StoreKind::Hf { repo: "HuggingFaceTB/SmolLM2-135M".into(), revision: "v1.0".into() });
        assert_eq!(hf.cache_key, PathBuf::from("hf/HuggingFaceTB/SmolLM2-135M/v1.0"));
        assert_eq!(remote("hf://o/m:abc").store, StoreKind::Hf { repo: "o/m".into(), revision: "abc".into() });
        assert_eq!(remote("hf://o/m").cache_key, PathBuf::from("hf/o/m/main"));
        assert_eq!(remote("hf://o/m/q.gguf").file.as_deref(), Some("q.gguf"));
        assert_eq!(remote("s3://b/../../etc").cache_key, PathBuf::from("s3/b/_/_/etc"));
        assert!(remote("az://c/p").can_list() && !remote("hf://o/m").can_list());
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        for (uri, says) in [
            ("ftp://x/y", "unknown scheme `ftp`"),
            ("s3:///x", "bucket name is empty"),
            ("hf://onlyorg", "expected hf://org/model"),
            ("hf://o/m/config.json", "only a .gguf"),
            ("pvc://claim/path", "mounted path"),
            ("hf://o/m/../../x.gguf", "may not contain"),
        ] {
            let e = parse(uri).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(says) && e.contains(uri), "{uri}: {e}");
        }
    }
}
