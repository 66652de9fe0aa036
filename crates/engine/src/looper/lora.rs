//! Which LoRA adapters the ranks hold: each plan carries the loads its sequences need
//! (in plan order, so every rank applies them alike) and the unloads that keep at most
//! `--max-cpu-loras` adapters resident, least recently used first, and drop adapters
//! unloaded over HTTP once no sequence uses them.

use std::collections::HashMap;
use std::path::PathBuf;

use tessera_runner::{LoraOp, StepPlan};

use crate::core::LoraRequest;

pub(crate) struct LoraSlots {
    max_resident: usize,
    /// Adapters the ranks hold, least recently used first.
    loaded: Vec<u32>,
    /// Name and directory of every adapter a request named.
    known: HashMap<u32, (String, PathBuf)>,
    /// Unloaded over HTTP: dropped once no sequence uses them.
    retired: Vec<u32>,
}

impl LoraSlots {
    pub(crate) fn new(max_resident: usize) -> Self {
        Self { max_resident: max_resident.max(1), loaded: vec![], known: HashMap::new(), retired: vec![] }
    }

    /// Remember where a request's adapter lives.
    pub(crate) fn note(&mut self, r: &LoraRequest) {
        self.known.entry(r.id).or_insert_with(|| (r.name.clone(), r.path.clone()));
    }

    pub(crate) fn retire(&mut self, id: u32) {
        if !self.retired.contains(&id) {
            self.retired.push(id);
        }
    }

    /// Whether any request has named an adapter (without, a step has no LoRA work).
    pub(crate) fn in_use(&self) -> bool {
        !self.known.is_empty()
    }

    pub(crate) fn name(&self, id: u32) -> Option<&str> {
        self.known.get(&id).map(|(n, _)| n.as_str())
    }

    /// The step of `ops` failed: the adapters it was to load are not held (they load again
    /// when next named, instead of every later step naming an adapter no rank holds).
    pub(crate) fn step_failed(&mut self, ops: &[LoraOp]) {
        for op in ops {
            if let LoraOp::Load { id, .. } = op {
                self.loaded.retain(|l| l != id);
            }
        }
    }

    /// Add to `plan` the loads of the adapters it uses that the ranks do not hold, then the
    /// unloads of retired adapters no live sequence (`live`) uses and of the least recently
    /// used ones beyond the resident limit (never one this plan uses).
    pub(crate) fn prepare(&mut self, plan: &mut StepPlan, live: &[u32]) {
        let mut used: Vec<u32> = plan.seqs.iter().filter_map(|s| s.lora).collect();
        used.sort_unstable();
        used.dedup();
        for &id in &used {
            match self.loaded.iter().position(|&l| l == id) {
                Some(i) => {
                    self.loaded.remove(i);
                }
                None => {
                    let (name, path) = self.known.get(&id).cloned().unwrap_or_default();
                    plan.lora_ops.push(LoraOp::Load { id, name, path });
                }
            }
            self.loaded.push(id);
        }
        let (loaded, known) = (&mut self.loaded, &mut self.known);
        self.retired.retain(|id| {
            if live.contains(id) || used.contains(id) {
                return true;
            }
            if let Some(i) = loaded.iter().position(|l| l == id) {
                loaded.remove(i);
                plan.lora_ops.push(LoraOp::Unload(*id));
            }
            known.remove(id);
            false
        });
        while self.loaded.len() > self.max_resident {
            let Some(i) = self.loaded.iter().position(|l| !used.contains(l)) else { break };
            plan.lora_ops.push(LoraOp::Unload(self.loaded.remove(i)));
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_runner::SeqStep;

    use super::*;

    fn plan(loras: &[Option<u32>]) -> StepPlan {
        let seq = |(i, l): (usize, &Option<u32>)| SeqStep {
            seq_id: i as u64,
            tokens: vec![1],
            start_pos: 0,
            block_table: vec![0],
            sample: None,
            prompt_logprobs: None,
            lora: *l,
        };
        StepPlan { seqs: loras.iter().enumerate().map(seq).collect(), lora_ops: vec![] }
    }

    fn req(id: u32) -> LoraRequest {
        LoraRequest { id, name: format!("a{id}"), path: format!("/mnt/lora/a{id}").into() }
    }

    #[test]
    fn loads_once_evicts_the_least_recently_used_and_drops_retired_adapters_when_idle() {
        let mut s = LoraSlots::new(2);
        (1..=3).for_each(|i| s.note(&req(i)));
        let mut p = plan(&[Some(1), None, Some(1)]);
        s.prepare(&mut p, &[1]);
        assert_eq!(p.lora_ops, vec![LoraOp::Load { id: 1, name: "a1".into(), path: "/mnt/lora/a1".into() }]);
        let mut p = plan(&[Some(1), Some(2)]);
        s.prepare(&mut p, &[1, 2]);
        assert_eq!(p.lora_ops.len(), 1, "adapter 1 is resident: only 2 loads");
        // A third adapter: the least recently used one not in this plan goes.
        let mut p = plan(&[Some(3), Some(2)]);
        s.prepare(&mut p, &[2, 3]);
        assert!(matches!(p.lora_ops[..], [LoraOp::Load { id: 3, .. }, LoraOp::Unload(1)]), "{:?}", p.lora_ops);
        // Retired while in use: kept until no sequence uses it.
        s.retire(2);
        let mut p = plan(&[Some(2)]);
        s.prepare(&mut p, &[2]);
        assert!(p.lora_ops.is_empty());
        let mut p = plan(&[None]);
        s.prepare(&mut p, &[]);
        assert_eq!(p.lora_ops, vec![LoraOp::Unload(2)]);
        assert_eq!(s.name(2), None);
        assert_eq!(s.name(3), Some("a3"));
        // A step that failed to load adapter 1 leaves it not held: the next plan loads it again.
        let mut p = plan(&[Some(1)]);
        s.prepare(&mut p, &[1]);
        s.step_failed(&p.lora_ops);
        let mut again = plan(&[Some(1)]);
        s.prepare(&mut again, &[1]);
        assert!(matches!(again.lora_ops[..], [LoraOp::Load { id: 1, .. }, ..]), "{:?}", again.lora_ops);
    }
}
