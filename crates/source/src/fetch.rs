//! `tessera fetch URI DIR`: download a whole model into a folder (the storage-initializer's
//! job), resuming partial files, verifying checksums where the store gives them, reporting
//! progress.

use std::io::Read;
use std::path::{Path, PathBuf};

use md5::Digest;

use crate::discover::Layout;
use crate::file::RemoteFile;
use crate::progress::{human, Progress};
use crate::uri::ModelUri;
use crate::{sidecar, Result, SourceError, SourceOptions};

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub files: Vec<PathBuf>,
    /// Bytes of all files.
    pub total: u64,
    /// Bytes downloaded now (less than `total` when a partial earlier fetch was resumed).
    pub downloaded: u64,
    /// Files whose checksum was verified (MD5 or SHA-256 from the ETag).
    pub verified: usize,
}

/// The checksum an ETag carries, if it is one: 32 hex digits are an MD5 (S3 single-part
/// uploads, s3s), 64 a SHA-256 (the Hugging Face hub's LFS files).
fn expected_digest(etag: &str) -> Option<(&'static str, String)> {
    let t = etag.trim_start_matches("W/").trim_matches('"').to_ascii_lowercase();
    if !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    match t.len() {
        32 => Some(("md5", t)),
        64 => Some(("sha256", t)),
        _ => None,
    }
}

/// The hex digest of a file's bytes.
fn digest<D: Digest>(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| SourceError::io(path, e))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut d = D::new();
    loop {
        match f.read(&mut buf).map_err(|e| SourceError::io(path, e))? {
            0 => break,
            n => d.update(&buf[..n]),
        }
    }
    Ok(d.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Check a complete file against its ETag's checksum; a mismatch removes the file so the next
/// attempt downloads it fresh.
fn verify(f: &RemoteFile, sidecar: &Path) -> Result<bool> {
    let Some((algo, want)) = f.etag.as_deref().and_then(expected_digest) else { return Ok(false) };
    let got = match algo {
        "md5" => digest::<md5::Md5>(&f.local)?,
        _ => digest::<sha2::Sha256>(&f.local)?,
    };
    if got != want && algo == "md5" {
        // S3 objects encrypted with SSE-KMS/SSE-C have 32-hex ETags that are not MD5s: a
        // mismatch cannot tell those from corruption, so it is reported, not acted on.
        tracing::warn!("{}: the ETag {want} is not the MD5 of the bytes ({got}); not verified (SSE-KMS/SSE-C objects' ETags are not MD5s)", f.what);
        return Ok(false);
    }
    if got != want {
        let _ = std::fs::remove_file(&f.local);
        let _ = std::fs::remove_file(sidecar);
        return Err(SourceError::Integrity(format!(
            "{}: {algo} checksum mismatch: the store says {want}, the downloaded bytes give {got}; the file was removed, fetch again",
            f.what
        )));
    }
    Ok(true)
}

/// Download the model at `uri` into `dir` (created if needed).
pub fn fetch(uri: &str, dir: &Path, opts: &SourceOptions) -> Result<Fetched> {
    let r = match crate::uri::parse(uri)? {
        ModelUri::Local(p) => {
            return Err(SourceError::Uri {
                uri: uri.into(),
                why: format!("already local ({}); serve it from there", p.display()),
            })
        }
        ModelUri::Remote(r) => r,
    };
    let (store, layout) = crate::open_remote(&r, opts)?;
    let names: Vec<String> = match layout {
        Layout::Gguf(name) => vec![name],
        Layout::Hf { small, index, shards } => small.into_iter().chain(index).chain(shards).collect(),
    };
    let files = names
        .iter()
        .map(|name| RemoteFile::open(&store, name, dir.join(name), sidecar(dir, name), opts.fetch.clone()))
        .collect::<Result<Vec<_>>>()?;
    let total: u64 = files.iter().map(|f| f.size).sum();
    let resumed: u64 = files.iter().map(|f| f.size - f.missing_bytes()).sum();
    tracing::info!(
        "fetching {uri} into {}: {} file(s), {}{}",
        dir.display(),
        files.len(),
        human(total),
        if resumed > 0 { format!(" ({} already there from an earlier fetch)", human(resumed)) } else { String::new() }
    );
    let progress = Progress::start(format!("fetch {uri}"), total);
    progress.add(resumed);
    let mut out = Fetched { total, ..Default::default() };
    for (f, name) in files.iter().zip(&names) {
        f.report_to(progress.clone());
        out.downloaded += f.ensure_all()?;
        if verify(f, &sidecar(dir, name))? {
            out.verified += 1;
        }
        out.files.push(f.local.clone());
    }
    progress.finish();
    // The (complete) sidecars stay in `.tessera/`: a rerun on the same folder sees every
    // file is already there and downloads nothing.
    tracing::info!(
        "fetched {uri}: {} downloaded, {} of {} file(s) checksum-verified",
        human(out.downloaded),
        out.verified,
        files.len()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_that_are_digests_are_recognised() {
        assert_eq!(expected_digest("\"0123456789abcdef0123456789ABCDEF\"").map(|d| d.0), Some("md5"));
        assert_eq!(expected_digest(&format!("\"{}\"", "a".repeat(64))).map(|d| d.0), Some("sha256"));
        assert_eq!(expected_digest("\"abc-3\""), None);
        assert_eq!(expected_digest("W/\"123\""), None);
    }
}
