//! Safetensors headers read and checked by us before anything is mapped, so a truncated file
//! or a header that lies about offsets is an error naming the file and the tensor — and so a
//! rank knows the absolute byte range of every tensor it reads.

use std::collections::HashMap;
use std::ops::Range;

use serde::Deserialize;

use crate::{LoadError, Result};

/// Largest header we accept (safetensors itself caps it at 100 MB).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Where a tensor's bytes are in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpan {
    pub file: usize,
    /// Absolute byte range in the file.
    pub bytes: Range<u64>,
}

/// Bytes per element of a safetensors dtype name.
fn dtype_size(d: &str) -> Option<u64> {
    Some(match d {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// The header length, from the first 8 bytes of a file of `file_len` bytes.
pub fn header_len(what: &str, first8: [u8; 8], file_len: u64) -> Result<u64> {
    let n = u64::from_le_bytes(first8);
    if n > MAX_HEADER || 8 + n > file_len {
        return Err(LoadError::Format(format!(
            "{what}: header length {n} does not fit the file's {file_len} bytes (truncated, or not a safetensors file)"
        )));
    }
    Ok(n)
}

/// Parse and check a header (the `n` bytes after the first 8) of file number `file`.
pub fn parse(what: &str, file: usize, header: &[u8], file_len: u64) -> Result<HashMap<String, TensorSpan>> {
    let mut raw: HashMap<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| LoadError::Format(format!("{what}: the header is not valid safetensors JSON: {e}")))?;
    raw.remove("__metadata__");
    let data_start = 8 + header.len() as u64;
    let data_len = file_len.saturating_sub(data_start);
    let mut spans: Vec<(String, Range<u64>)> = Vec::with_capacity(raw.len());
    for (name, v) in raw {
        let e: Entry = serde_json::from_value(v)
            .map_err(|err| LoadError::Format(format!("{what}: tensor {name}: bad header entry: {err}")))?;
        let size = dtype_size(&e.dtype)
            .ok_or_else(|| LoadError::Format(format!("{what}: tensor {name}: unknown dtype {}", e.dtype)))?;
        let (b, end) = e.data_offsets;
        let need = e.shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d as u64));
        if end < b || Some(end - b) != need {
            return Err(LoadError::Format(format!(
                "{what}: tensor {name}: data_offsets [{b}, {end}) do not match dtype {} × shape {:?} ({} bytes): the header lies",
                e.dtype,
                e.shape,
                need.map_or("too many".into(), |n| n.to_string())
            )));
        }
        if end > data_len {
            return Err(LoadError::Format(format!(
                "{what}: tensor {name}: its data ends at byte {end} of the data section, which holds only {data_len} bytes (file truncated?)"
            )));
        }
        spans.push((name, b..end));
    }
    spans.sort_by_key(|(_, r)| (r.start, r.end));
    let mut at = 0;
    for (name, r) in &spans {
        if r.start < at {
            return Err(LoadError::Format(format!(
                "{what}: tensor {name}: data_offsets [{}, {}) overlap the previous tensor's data: the header lies",
                r.start, r.end
            )));
        }
        at = r.end;
    }
    Ok(spans
        .into_iter()
        .map(|(n, r)| (n, TensorSpan { file, bytes: data_start + r.start..data_start + r.end }))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(json: &str) -> Vec<u8> {
        json.as_bytes().to_vec()
    }

    #[test]
    fn spans_are_absolute_and_lies_name_the_tensor() {
        let h = header(
            r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]},"__metadata__":{"format":"pt"}}"#,
        );
        let start = 8 + h.len() as u64;
        let spans = parse("m.safetensors", 0, &h, start + 24).map_err(|e| e.to_string());
        let spans = spans.as_ref().map(|s| (s["a"].bytes.clone(), s["b"].bytes.clone()));
        assert_eq!(spans, Ok((start..start + 16, start + 16..start + 24)));
        let truncated = parse("m.safetensors", 0, &h, start + 20).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(truncated.contains("tensor b") && truncated.contains("truncated"), "{truncated}");
        let lie = header(r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#);
        let e = parse("m.safetensors", 0, &lie, 1000).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("tensor a") && e.contains("lies"), "{e}");
        let overlap = header(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        );
        let e = parse("m.safetensors", 0, &overlap, 1000).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("tensor b") && e.contains("overlap"), "{e}");
        assert!(header_len("m", 50u64.to_le_bytes(), 40).is_err());
        let e = parse("m.safetensors", 0, b"{not json", 100).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not valid safetensors JSON"), "{e}");
    }
}
