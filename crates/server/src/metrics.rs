//! `/metrics`: the vLLM metric names the llm-d endpoint picker scrapes, read live from the
//! engine's [`EngineStats`] at scrape time.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tessera_engine::{EngineStats, Histogram};

#[derive(Debug)]
struct EngineCollector {
    stats: Arc<EngineStats>,
    model_name: String,
}

impl EngineCollector {
    fn labels(&self) -> [(&'static str, String); 1] {
        [("model_name", self.model_name.clone())]
    }

    fn gauge(&self, enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m.encode_family(&self.labels())?)
    }

    fn histogram(&self, enc: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> std::fmt::Result {
        let (buckets, sum, count) = h.snapshot();
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
        m.encode_family(&self.labels())?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn counter(&self, enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(m.encode_family(&self.labels())?)
    }
}

impl Collector for EngineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.stats;
        let usage = s.kv_usage();
        self.gauge(
            &mut enc,
            "vllm:num_requests_running",
            "Requests in the running batch.",
            s.running.load(Ordering::Relaxed) as f64,
        )?;
        self.gauge(
            &mut enc,
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            s.waiting.load(Ordering::Relaxed) as f64,
        )?;
        self.gauge(&mut enc, "vllm:kv_cache_usage_perc", "KV cache usage, 0..1.", usage)?;
        self.gauge(&mut enc, "vllm:gpu_cache_usage_perc", "KV cache usage, 0..1 (legacy name).", usage)?;
        {
            let mut m =
                enc.encode_descriptor("vllm:cache_config_info", "KV cache configuration.", None, MetricType::Gauge)?;
            let labels = [("block_size", s.block_size.to_string()), ("num_gpu_blocks", s.num_blocks.to_string())];
            ConstGauge::new(1.0).encode(m.encode_family(&labels)?)?;
        }
        {
            let mut m = enc.encode_descriptor(
                "vllm:lora_requests_info",
                "LoRA adapters in use (none are loaded).",
                None,
                MetricType::Gauge,
            )?;
            let labels = [
                ("max_lora", "0".to_string()),
                ("running_lora_adapters", String::new()),
                ("waiting_lora_adapters", String::new()),
            ];
            ConstGauge::new(1.0).encode(m.encode_family(&labels)?)?;
        }
        self.histogram(&mut enc, "vllm:time_to_first_token_seconds", "Time to first token.", &s.ttft)?;
        self.histogram(&mut enc, "vllm:inter_token_latency_seconds", "Time between tokens of a choice.", &s.itl)?;
        self.histogram(&mut enc, "vllm:e2e_request_latency_seconds", "Arrival to end of a choice.", &s.e2e)?;
        self.histogram(&mut enc, "vllm:request_queue_time_seconds", "Arrival to first scheduling.", &s.queue_time)?;
        self.counter(
            &mut enc,
            "vllm:prompt_tokens",
            "Prompt tokens received.",
            s.prompt_tokens.load(Ordering::Relaxed),
        )?;
        self.counter(
            &mut enc,
            "vllm:generation_tokens",
            "Tokens generated.",
            s.generation_tokens.load(Ordering::Relaxed),
        )?;
        self.counter(
            &mut enc,
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_queries.load(Ordering::Relaxed),
        )?;
        self.counter(
            &mut enc,
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            s.prefix_hits.load(Ordering::Relaxed),
        )?;
        self.counter(&mut enc, "vllm:num_preemptions", "Sequences preempted.", s.preemptions.load(Ordering::Relaxed))?;
        self.counter(&mut enc, "tessera:engine_steps", "Engine steps run.", s.steps.load(Ordering::Relaxed))?;
        self.counter(
            &mut enc,
            "tessera:engine_batched_steps",
            "Engine steps that ran more than one sequence.",
            s.batched_steps.load(Ordering::Relaxed),
        )?;
        let mut m =
            enc.encode_descriptor("vllm:request_success", "Requests finished, by reason.", None, MetricType::Counter)?;
        for (reason, c) in [("stop", &s.finished_stop), ("length", &s.finished_length), ("abort", &s.finished_abort)] {
            let labels = [("model_name", self.model_name.clone()), ("finished_reason", reason.to_string())];
            ConstCounter::new(c.load(Ordering::Relaxed)).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Render the metrics text for one scrape.
pub(crate) fn render(stats: &Arc<EngineStats>, model_name: &str) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(EngineCollector { stats: stats.clone(), model_name: model_name.to_string() }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}
