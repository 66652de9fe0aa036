use super::*;

fn sched(blocks: usize, bs: usize, max_seqs: usize, budget: usize) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_seqs: max_seqs,
            max_num_batched_tokens: budget,
            enable_chunked_prefill: true,
            policy: Policy::Fcfs,
            max_loras: 1,
        },
        KvCacheManager::new(blocks, bs, true),
    )
}

fn seq(id: u64, len: usize) -> Sequence {
    Sequence::new(id, (0..len as u32).map(|t| t + 1000 * id as u32).collect(), SamplingConfig::default())
}

/// Pretend to execute: every sampling sequence gets token 7.
fn run(s: &mut Scheduler) -> Scheduled {
    let out = s.schedule();
    let results: Vec<StepResult> = out
        .plan
        .seqs
        .iter()
        .filter(|st| st.sample.is_some())
        .map(|st| StepResult { seq_id: st.seq_id, token: Some(7), logprobs: None, prompt_logprobs: vec![] })
        .collect();
    s.apply(&results);
    out
}

fn shape(out: &Scheduled) -> Vec<(u64, usize, bool)> {
    out.plan.seqs.iter().map(|s| (s.seq_id, s.tokens.len(), s.sample.is_some())).collect()
}

#[test]
fn budget_is_shared_in_arrival_order_and_chunks_the_tail() {
    let mut s = sched(64, 4, 8, 16);
    for id in 1..=3 {
        s.add(seq(id, 10));
    }
    let out = run(&mut s);
    assert_eq!(shape(&out), vec![(1, 10, true), (2, 6, false)]);
    // Next step: running first (1 decodes, 2 finishes its prompt), then 3 gets the rest.
    let out = run(&mut s);
    assert_eq!(shape(&out), vec![(1, 1, true), (2, 4, true), (3, 10, true)]);
    assert_eq!(out.plan.num_tokens(), 15);
}

#[test]
fn long_prompt_is_chunked_and_samples_only_at_the_end() {
    let mut s = sched(64, 4, 8, 16);
    s.add(seq(1, 40));
    let chunks: Vec<_> = (0..3).map(|_| shape(&run(&mut s))).collect();
    assert_eq!(chunks, vec![vec![(1, 16, false)], vec![(1, 16, false)], vec![(1, 8, true)]]);
    let seq = s.get(1).unwrap();
    assert_eq!(seq.num_computed, 40);
    assert_eq!(seq.tokens.len(), 41);
    // Positions continue where the last chunk ended.
    let out = s.schedule();
    assert_eq!(out.plan.seqs[0].start_pos, 40);
    assert_eq!(out.plan.seqs[0].block_table.len(), 11);
}

#[test]
fn chunked_prefill_off_waits_for_room() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 16,
            enable_chunked_prefill: false,
            policy: Policy::Fcfs,
            max_loras: 1,
        },
        KvCacheManager::new(64, 4, true),
    );
    s.add(seq(1, 10));
    s.add(seq(2, 10));
    assert_eq!(shape(&run(&mut s)), vec![(1, 10, true)]);
    assert_eq!(shape(&run(&mut s)), vec![(1, 1, true), (2, 10, true)]);
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut s = sched(64, 4, 2, 100);
    for id in 1..=3 {
        s.add(seq(id, 3));
    }
    assert_eq!(run(&mut s).plan.seqs.len(), 2);
    assert_eq!(s.num_waiting(), 1);
    s.remove(1);
    let out = run(&mut s);
    assert_eq!(shape(&out), vec![(2, 1, true), (3, 3, true)]);
}

#[test]
fn preemption_frees_the_newest_and_recomputes_it_later() {
    // 4 blocks of 4 tokens: two 8-token prompts take 2 blocks each; the first decode that
    // needs a third block must preempt.
    let mut s = sched(4, 4, 8, 64);
    s.add(seq(1, 8));
    s.add(seq(2, 8));
    run(&mut s); // both prefilled, each has 9 tokens now (8 + sampled)
    assert_eq!(s.kv().num_free(), 0);
    let out = run(&mut s); // seq 1 needs a 3rd block for its 9th token
    assert_eq!(out.preempted, vec![2]);
    assert_eq!(shape(&out), vec![(1, 1, true)]);
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(s.get(2).unwrap().num_computed, 0);
    // Once 1 ends, 2 is recomputed: prompt + its generated token, minus the first block,
    // which survived in the prefix cache (the tail block was evicted first).
    s.remove(1);
    let out = run(&mut s);
    assert_eq!(out.prefix_hits, vec![(2, 4)]);
    assert_eq!(shape(&out), vec![(2, 5, true)]);
    assert_eq!(out.plan.seqs[0].sample.as_ref().unwrap().output_index, 1);
    s.remove(2);
    assert_eq!(s.kv().num_free(), 4, "every block back in the pool");
}

#[test]
fn repeated_prefix_is_not_recomputed() {
    let mut s = sched(64, 4, 8, 64);
    s.add(seq(1, 10));
    run(&mut s);
    s.remove(1);
    s.add(Sequence::new(2, seq(1, 10).tokens, SamplingConfig::default()));
    let out = run(&mut s);
    assert_eq!(out.prefix_hits, vec![(2, 8)]);
    assert_eq!(out.plan.seqs[0].start_pos, 8);
    assert_eq!(out.plan.seqs[0].tokens.len(), 2);
    assert_eq!(s.kv().stats().hits, 8);
}

#[test]
fn a_fork_shares_the_parents_prompt_blocks() {
    // Prefix caching off: sharing must come from the fork itself.
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 64,
            enable_chunked_prefill: true,
            policy: Policy::Fcfs,
            max_loras: 1,
        },
        KvCacheManager::new(16, 4, false),
    );
    s.add(seq(1, 10));
    run(&mut s);
    let used_by_parent = 16 - s.kv().num_free();
    s.add_fork(Sequence::new(2, seq(1, 10).tokens, SamplingConfig::default()), 1);
    assert_eq!(16 - s.kv().num_free(), used_by_parent, "a waiting fork holds no blocks");
    let out = run(&mut s);
    // The child computes only the last partial block's 2 tokens.
    assert_eq!(shape(&out), vec![(1, 1, true), (2, 2, true)]);
    assert_eq!(s.kv().block_table(2)[..2], s.kv().block_table(1)[..2]);
    assert_eq!(16 - s.kv().num_free(), used_by_parent + 1, "only one new block for the child");
    s.remove(1);
    s.remove(2);
    assert_eq!(s.kv().num_free(), 16);
}

fn prio_sched(max_seqs: usize, policy: Policy) -> Scheduler {
    Scheduler::new(
        SchedulerConfig {
            max_num_seqs: max_seqs,
            max_num_batched_tokens: 64,
            enable_chunked_prefill: true,
            policy,
            max_loras: 1,
        },
        KvCacheManager::new(64, 4, true),
    )
}

#[test]
fn a_critical_arrival_preempts_a_lower_class_but_equals_wait() {
    let mut s = prio_sched(2, Policy::Fcfs);
    s.add(seq(1, 3).with_priority(1, 0));
    s.add(seq(2, 3).with_priority(2, 0));
    run(&mut s);
    s.add(seq(3, 3).with_priority(2, 0));
    let out = run(&mut s);
    assert!(out.preempted.is_empty(), "no better class than the worst running: waits");
    assert_eq!(s.num_waiting(), 1);
    s.remove(3);
    s.add(seq(4, 3).with_priority(0, 0));
    let out = run(&mut s);
    assert_eq!(out.preempted, vec![2], "the sheddable one makes room");
    assert_eq!(shape(&out), vec![(1, 1, true), (4, 3, true)]);
}

#[test]
fn priority_policy_orders_the_queue_and_fcfs_ignores_priority() {
    for (policy, first) in [(Policy::Priority, 3), (Policy::Fcfs, 2)] {
        let mut s = prio_sched(1, policy);
        s.add(seq(1, 3));
        run(&mut s);
        s.add(seq(2, 3).with_priority(1, 5));
        s.add(seq(3, 3).with_priority(1, -5));
        s.remove(1);
        let out = run(&mut s);
        assert_eq!(out.plan.seqs[0].seq_id, first, "{policy:?}");
    }
}

fn remote(blocks: usize, num_tokens: usize) -> Box<RemoteSource> {
    Box::new(RemoteSource {
        host: "127.0.0.1".into(),
        port: 1,
        engine_id: None,
        block_ids: (100..100 + blocks as u32).collect(),
        token: "t".into(),
        num_tokens,
    })
}

#[test]
fn a_remote_prefill_is_pulled_then_only_its_last_token_computed() {
    let mut s = sched(16, 4, 8, 16);
    let mut a = seq(1, 10);
    a.remote = Some(remote(3, 10));
    s.add(a);
    s.add(seq(2, 5));
    let out = run(&mut s);
    // The pulled sequence takes no compute (and no budget) this step; the other runs.
    assert_eq!(shape(&out), vec![(2, 5, true)]);
    assert_eq!(out.pulls.len(), 1);
    let job = &out.pulls[0];
    // Blocks of the first 9 tokens (3 of 4), mapped remote -> local in order.
    assert_eq!(job.remote, vec![100, 101, 102]);
    assert_eq!(job.local, s.kv().block_table(1)[..3].to_vec());
    assert_eq!(s.kv().block_table(1).len(), 3, "blocks for the whole prompt");
    assert_eq!((s.num_pulling(), s.num_waiting()), (1, 1));
    assert!(s.pull_done(1, true));
    let out = run(&mut s);
    assert_eq!(shape(&out), vec![(1, 1, true), (2, 1, true)]);
    assert_eq!(out.plan.seqs[0].start_pos, 9);
}

#[test]
fn a_failed_pull_recomputes_and_a_cancelled_one_frees_its_blocks_only_when_it_ends() {
    let mut s = sched(16, 4, 8, 16);
    let mut a = seq(1, 10);
    a.remote = Some(remote(3, 10));
    s.add(a);
    run(&mut s);
    assert!(s.pull_done(1, false));
    assert_eq!(shape(&run(&mut s)), vec![(1, 10, true)], "the whole prompt is computed here");

    let mut b = seq(2, 10);
    b.remote = Some(remote(3, 10));
    s.add(b);
    run(&mut s);
    let free = s.kv().num_free();
    assert!(s.remove(2).is_some());
    assert_eq!(s.kv().num_free(), free, "the pull may still write the blocks");
    assert!(!s.pull_done(2, true));
    assert_eq!(s.kv().num_free(), free + 3);
}

#[test]
fn a_prompt_of_one_block_or_a_short_remote_list_is_computed_locally() {
    let mut s = sched(16, 4, 8, 16);
    let mut a = seq(1, 1);
    a.remote = Some(remote(1, 1));
    s.add(a);
    let mut b = seq(2, 10);
    b.remote = Some(remote(2, 10)); // needs 3 blocks
    s.add(b);
    let out = run(&mut s);
    assert!(out.pulls.is_empty());
    assert_eq!(shape(&out), vec![(1, 1, true), (2, 10, true)]);
}

#[test]
fn max_loras_holds_back_a_new_adapter_and_lets_the_base_and_running_adapters_pass() {
    let mut s = sched(64, 4, 8, 256);
    let on = |id: u64, lora: Option<u32>| Sequence { lora, ..seq(id, 6) };
    s.add(on(1, Some(10)));
    s.add(on(2, Some(20)));
    s.add(on(3, None));
    s.add(on(4, Some(10)));
    let out = run(&mut s);
    let ids: Vec<u64> = out.plan.seqs.iter().map(|x| x.seq_id).collect();
    assert_eq!(ids, vec![1, 3, 4], "adapter 20 waits while adapter 10 fills the one slot");
    assert_eq!(out.plan.seqs.iter().map(|x| x.lora).collect::<Vec<_>>(), vec![Some(10), None, Some(10)]);
    assert_eq!(s.loras(), (vec![10], vec![20]));
    s.remove(1);
    s.remove(4);
    let out = run(&mut s);
    assert!(out.plan.seqs.iter().any(|x| x.seq_id == 2), "adapter 20 starts once adapter 10 is gone");
    assert_eq!(s.loras(), (vec![20], vec![]));
}

/// A critical request on an adapter that cannot start (`max_loras` taken) preempts nothing:
/// it would not be admitted, and the victim would be admitted and preempted again, forever.
#[test]
fn a_blocked_adapter_preempts_nothing() {
    let mut s = prio_sched(2, Policy::Fcfs);
    let on = |id: u64, lora: Option<u32>| Sequence { lora, ..seq(id, 6) };
    s.add(on(1, Some(10)));
    s.add(on(2, Some(10)));
    run(&mut s);
    s.add(on(3, Some(20)).with_priority(0, 0));
    let out = run(&mut s);
    assert!(out.preempted.is_empty(), "preempted {:?}", out.preempted);
    assert_eq!(s.num_running(), 2);
    assert_eq!(s.loras(), (vec![10], vec![20]));
}
