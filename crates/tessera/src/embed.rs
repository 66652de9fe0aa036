//! Serving an embedding model (`--task embed`, `--runner pooling`, or an encoder checkpoint
//! under `auto`): the encoder runs on its own thread, which batches whatever requests are
//! waiting (up to `MAX_BATCH` inputs) into one padded forward pass.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use tessera_server::{Embed, ServedModel};
use tokio::sync::oneshot;

use crate::args::{RunnerArg, ServeArgs, TaskArg};
use crate::ServeError;

/// Inputs per forward pass at most.
const MAX_BATCH: usize = 32;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, String>>;

/// Whether `a` serves embeddings: asked for, or `auto` on an encoder's `config.json`.
pub(crate) fn wanted(a: &ServeArgs, model: &Path) -> bool {
    if a.task == TaskArg::Embed || a.runner == RunnerArg::Pooling {
        return true;
    }
    if a.task != TaskArg::Auto || a.runner != RunnerArg::Auto {
        return false;
    }
    let config = std::fs::read_to_string(model.join("config.json")).unwrap_or_default();
    tessera_models::BertConfig::from_hf_json(&config).is_ok()
}

struct Encoder {
    jobs: Mutex<mpsc::Sender<(Vec<Vec<u32>>, Reply)>>,
    dims: usize,
    max_tokens: usize,
}

impl Embed for Encoder {
    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn dims(&self) -> usize {
        self.dims
    }

    fn embed(&self, inputs: Vec<Vec<u32>>) -> oneshot::Receiver<Result<Vec<Vec<f32>>, String>> {
        let (tx, rx) = oneshot::channel();
        if let Ok(jobs) = self.jobs.lock() {
            // A send error drops `tx`: the caller sees the worker gone.
            let _ = jobs.send((inputs, tx));
        }
        rx
    }
}

/// The batching loop: take one request, then every other waiting one up to `MAX_BATCH`
/// inputs, run them as one batch, and answer each with its own rows.
fn run(enc: tessera_loader::EncoderModel, rx: mpsc::Receiver<(Vec<Vec<u32>>, Reply)>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut n = jobs[0].0.len();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => {
                    n += j.0.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let all: Vec<Vec<u32>> = jobs.iter().flat_map(|(inputs, _)| inputs.iter().cloned()).collect();
        match enc.model.embed(&all, enc.pooling, enc.normalize) {
            Ok(mut rows) => {
                for (inputs, reply) in jobs {
                    let rest = rows.split_off(inputs.len());
                    let _ = reply.send(Ok(rows));
                    rows = rest;
                }
            }
            Err(e) => {
                for (_, reply) in jobs {
                    let _ = reply.send(Err(format!("embedding failed: {e}")));
                }
            }
        }
    }
}

/// Load the encoder at `model` and start its batching thread.
pub(crate) fn load(a: &ServeArgs, model: &Path) -> Result<ServedModel, ServeError> {
    let device = candle_core::Device::Cpu;
    let dtype = crate::serve::pick_dtype(a.dtype, &device);
    let enc = tessera_loader::open_encoder(model, dtype, &device)?;
    let (dims, max_tokens, vocab) = (enc.model.config().hidden_size, enc.max_tokens, enc.model.config().vocab_size);
    let tokenizer = Arc::new(enc.tokenizer.clone());
    tracing::info!(
        "embeddings: {dims}-dimensional, {:?} pooling{}, inputs up to {max_tokens} tokens, batches of up to {MAX_BATCH}",
        enc.pooling,
        if enc.normalize { ", normalised" } else { "" }
    );
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("tessera-embed".into()).spawn(move || run(enc, rx)).map_err(ServeError::Io)?;
    Ok(ServedModel {
        engine: None,
        replicas: vec![],
        tokenizer,
        chat_template: None,
        defaults: Default::default(),
        vocab_size: vocab,
        kv: None,
        tools: Default::default(),
        embedder: Some(Arc::new(Encoder { jobs: Mutex::new(tx), dims, max_tokens })),
    })
}
