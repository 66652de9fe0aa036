//! `/metrics`: the vLLM metric names the llm-d endpoint picker scrapes, read live from each
//! engine's [`EngineStats`] at scrape time. Every sample carries `model_name` and `engine`
//! (the data-parallel replica, as vLLM labels them).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tessera_engine::kv::transfer::Fallback;
use tessera_engine::{EngineStats, Histogram};

#[derive(Debug)]
struct EngineCollector {
    engines: Vec<Arc<EngineStats>>,
    model_name: String,
    /// `--max-loras` (0 without LoRA).
    max_lora: usize,
}

type Labels = Vec<(&'static str, String)>;

impl EngineCollector {
    fn labels(&self, engine: usize) -> Labels {
        vec![("model_name", self.model_name.clone()), ("engine", engine.to_string())]
    }

    fn gauge(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: impl Fn(&EngineStats) -> f64,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (i, s) in self.engines.iter().enumerate() {
            ConstGauge::new(v(s)).encode(m.encode_family(&self.labels(i))?)?;
        }
        Ok(())
    }

    /// A counter with one sample per engine and value of `label`.
    fn counter_by(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        label: &'static str,
        values: impl Fn(&EngineStats) -> Vec<(&'static str, u64)>,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (i, s) in self.engines.iter().enumerate() {
            for (value, n) in values(s) {
                let mut labels = self.labels(i);
                labels.push((label, value.to_string()));
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn counter(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        v: impl Fn(&EngineStats) -> u64,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (i, s) in self.engines.iter().enumerate() {
            ConstCounter::new(v(s)).encode(m.encode_family(&self.labels(i))?)?;
        }
        Ok(())
    }

    fn histogram(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        h: impl Fn(&EngineStats) -> &Histogram,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (i, s) in self.engines.iter().enumerate() {
            let (buckets, sum, count) = h(s).snapshot();
            m.encode_family(&self.labels(i))?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }

    /// `tessera:kernel_path{kernel, path, reason}`: which path each fused kernel takes after
    /// its start-up check against the reference (`fused`, or `reference` and why).
    fn kernel_paths(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let help = "Path of each fused kernel after its start-up check: fused, or reference (and why).";
        let mut m = enc.encode_descriptor("tessera:kernel_path", help, None, MetricType::Gauge)?;
        for (i, s) in self.engines.iter().enumerate() {
            let paths = s.kernel_paths.lock().map(|p| p.clone()).unwrap_or_default();
            for (kernel, path, reason) in paths {
                let l: Labels = vec![("kernel", kernel), ("path", path), ("reason", reason), ("engine", i.to_string())];
                ConstGauge::new(1.0).encode(m.encode_family(&l)?)?;
            }
        }
        Ok(())
    }

    /// `vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}`: the
    /// adapters of running and waiting requests (comma-separated), valued with the time of
    /// the scrape as vLLM does (the endpoint picker reads the newest sample).
    fn lora_info(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let help = "Running and waiting LoRA adapters, and the most in one batch.";
        let mut m = enc.encode_descriptor("vllm:lora_requests_info", help, None, MetricType::Gauge)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        for (i, s) in self.engines.iter().enumerate() {
            let (running, waiting) = s.loras();
            let l: Labels = vec![
                ("max_lora", self.max_lora.to_string()),
                ("running_lora_adapters", running.join(",")),
                ("waiting_lora_adapters", waiting.join(",")),
                ("engine", i.to_string()),
            ];
            ConstGauge::new(now).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }

    /// A gauge of value 1 whose labels carry the information.
    fn info(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        labels: impl Fn(&EngineStats) -> Labels,
    ) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (i, s) in self.engines.iter().enumerate() {
            let mut l = labels(s);
            l.push(("engine", i.to_string()));
            ConstGauge::new(1.0).encode(m.encode_family(&l)?)?;
        }
        Ok(())
    }
}

fn load(a: &std::sync::atomic::AtomicUsize) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

fn count(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut enc;
        self.gauge(e, "vllm:num_requests_running", "Requests in the running batch.", |s| load(&s.running))?;
        self.gauge(e, "vllm:num_requests_waiting", "Requests waiting to be scheduled.", |s| load(&s.waiting))?;
        self.gauge(e, "vllm:kv_cache_usage_perc", "KV cache usage, 0..1.", |s| s.kv_usage())?;
        self.gauge(e, "vllm:gpu_cache_usage_perc", "KV cache usage, 0..1 (legacy name).", |s| s.kv_usage())?;
        self.info(e, "vllm:cache_config_info", "KV cache configuration.", |s| {
            vec![("block_size", s.block_size.to_string()), ("num_gpu_blocks", s.num_blocks.to_string())]
        })?;
        self.kernel_paths(e)?;
        self.lora_info(e)?;
        self.histogram(e, "vllm:time_to_first_token_seconds", "Time to first token.", |s| &s.ttft)?;
        self.histogram(e, "vllm:inter_token_latency_seconds", "Time between tokens of a choice.", |s| &s.itl)?;
        self.histogram(e, "vllm:e2e_request_latency_seconds", "Arrival to end of a choice.", |s| &s.e2e)?;
        self.histogram(e, "vllm:request_queue_time_seconds", "Arrival to first scheduling.", |s| &s.queue_time)?;
        self.counter(e, "vllm:prompt_tokens", "Prompt tokens received.", |s| count(&s.prompt_tokens))?;
        self.counter(e, "vllm:generation_tokens", "Tokens generated.", |s| count(&s.generation_tokens))?;
        self.counter(e, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", |s| {
            count(&s.prefix_queries)
        })?;
        self.counter(e, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", |s| {
            count(&s.prefix_hits)
        })?;
        self.counter(e, "vllm:num_preemptions", "Sequences preempted.", |s| count(&s.preemptions))?;
        self.counter(e, "tessera:engine_steps", "Engine steps run.", |s| count(&s.steps))?;
        self.counter(e, "tessera:engine_batched_steps", "Engine steps that ran more than one sequence.", |s| {
            count(&s.batched_steps)
        })?;
        self.counter(e, "tessera:prompt_tokens_computed", "Prompt positions run through the model.", |s| {
            count(&s.prompt_tokens_computed)
        })?;
        self.counter(e, "tessera:kv_transfer_blocks_sent", "KV blocks sent to decode workers.", |s| {
            count(&s.kv.blocks_sent)
        })?;
        self.counter(e, "tessera:kv_transfer_bytes_sent", "KV bytes sent to decode workers.", |s| {
            count(&s.kv.bytes_sent)
        })?;
        self.counter(e, "tessera:kv_transfer_blocks_received", "KV blocks pulled from prefill workers.", |s| {
            count(&s.kv.blocks_received)
        })?;
        self.counter(e, "tessera:kv_transfer_bytes_received", "KV bytes pulled from prefill workers.", |s| {
            count(&s.kv.bytes_received)
        })?;
        self.histogram(e, "tessera:kv_transfer_latency_seconds", "Duration of successful KV pulls.", |s| {
            &s.kv.latency
        })?;
        self.gauge(e, "tessera:kv_pinned_blocks", "KV blocks held for decode workers.", |s| load(&s.kv.pinned_blocks))?;
        self.counter(e, "tessera:kv_pins_expired", "Prefilled requests whose KV nobody pulled in time.", |s| {
            count(&s.kv.pins_expired)
        })?;
        let fallbacks = "Decode legs that computed their prompt locally, by reason.";
        self.counter_by(e, "tessera:kv_transfer_fallbacks", fallbacks, "reason", |s| {
            Fallback::ALL.iter().map(|&why| (why.as_str(), s.kv.fallbacks(why))).collect()
        })?;
        self.counter_by(e, "vllm:request_success", "Requests finished, by reason.", "finished_reason", |s| {
            vec![
                ("stop", count(&s.finished_stop)),
                ("length", count(&s.finished_length)),
                ("abort", count(&s.finished_abort)),
            ]
        })
    }
}

/// Render the metrics text for one scrape.
pub(crate) fn render(
    engines: &[Arc<EngineStats>],
    model_name: &str,
    max_lora: usize,
) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    let model_name = model_name.to_string();
    reg.register_collector(Box::new(EngineCollector { engines: engines.to_vec(), model_name, max_lora }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}
