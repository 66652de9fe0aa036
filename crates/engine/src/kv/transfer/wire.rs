//! The KV-transfer wire: the puller sends one JSON line ([`Hello`]), the server answers one
//! JSON line ([`Reply`]) and, if it agreed, one frame per layer: `u64 length | u32 crc32 |
//! bytes` (little-endian), the layer's keys of every block, then its values.

use std::io::{BufRead, Read, Write};

use super::KvLayout;

pub const VERSION: u32 = 1;
/// The longest hello or reply line accepted.
const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub version: u32,
    pub layout: KvLayout,
    /// The engine the puller expects to reach (`remote_engine_id`).
    pub engine_id: Option<String>,
    pub token: String,
    pub blocks: Vec<u32>,
    pub num_tokens: usize,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// Why the server refused; then nothing follows.
    pub error: Option<String>,
    pub layers: usize,
    pub block_bytes: usize,
}

pub fn write_line<T: serde::Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

pub fn read_line<T: serde::de::DeserializeOwned>(r: &mut impl BufRead) -> std::io::Result<T> {
    let mut line = Vec::new();
    r.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed mid-message"));
    }
    serde_json::from_slice(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub fn write_frame(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&(data.len() as u64).to_le_bytes());
    head[8..].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)
}

/// Read a frame that must be `len` bytes long into `buf`, checking its length and checksum.
pub fn read_frame(r: &mut impl Read, len: usize, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head).map_err(|e| format!("reading a KV frame: {e}"))?;
    let got = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    if got != len as u64 {
        return Err(format!("KV frame of {got} bytes, expected {len}"));
    }
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| format!("reading a KV frame: {e}"))?;
    let crc = u32::from_le_bytes(head[8..].try_into().unwrap_or_default());
    if crc32fast::hash(buf) != crc {
        return Err("KV frame checksum mismatch".into());
    }
    Ok(())
}
