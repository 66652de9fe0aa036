//! KServe's conditions (knative shape) and their roll-ups.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::api::Condition;

pub const READY: &str = "Ready";
pub const PRESETS_COMBINED: &str = "PresetsCombined";
pub const WORKLOADS_READY: &str = "WorkloadsReady";
pub const MAIN_WORKLOAD_READY: &str = "MainWorkloadReady";
pub const WORKER_WORKLOAD_READY: &str = "WorkerWorkloadReady";
pub const PREFILL_WORKLOAD_READY: &str = "PrefillWorkloadReady";
pub const PREFILL_WORKER_WORKLOAD_READY: &str = "PrefillWorkerWorkloadReady";
pub const ROUTER_READY: &str = "RouterReady";
pub const GATEWAYS_READY: &str = "GatewaysReady";
pub const HTTPROUTES_READY: &str = "HTTPRoutesReady";
pub const INFERENCE_POOL_READY: &str = "InferencePoolReady";
pub const SCHEDULER_WORKLOAD_READY: &str = "SchedulerWorkloadReady";

const WORKLOAD_PARTS: &[&str] =
    &[MAIN_WORKLOAD_READY, WORKER_WORKLOAD_READY, PREFILL_WORKLOAD_READY, PREFILL_WORKER_WORKLOAD_READY];
const ROUTER_PARTS: &[&str] = &[GATEWAYS_READY, HTTPROUTES_READY, INFERENCE_POOL_READY, SCHEDULER_WORKLOAD_READY];

/// `True`, `False` or `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

fn now() -> String {
    serde_json::to_value(Time(Timestamp::now())).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// A service's condition set, starting from its current status so transition times are kept
/// for conditions whose status does not change.
#[derive(Clone, Debug, Default)]
pub struct Conditions(pub Vec<Condition>);

impl Conditions {
    pub fn get(&self, ty: &str) -> Option<&Condition> {
        self.0.iter().find(|c| c.type_ == ty)
    }

    pub fn is_true(&self, ty: &str) -> bool {
        self.get(ty).is_some_and(|c| c.status == "True")
    }

    pub fn set(&mut self, ty: &str, status: Status, reason: &str, message: &str) {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let mut c = Condition {
            type_: ty.to_string(),
            status: status.as_str().to_string(),
            severity: None,
            last_transition_time: None,
            reason: opt(reason),
            message: opt(message),
        };
        match self.0.iter_mut().find(|c| c.type_ == ty) {
            Some(old) => {
                c.last_transition_time =
                    if old.status == c.status { old.last_transition_time.clone() } else { Some(now()) };
                *old = c;
            }
            None => {
                c.last_transition_time = Some(now());
                self.0.push(c);
            }
        }
        self.0.sort_by(|a, b| a.type_.cmp(&b.type_));
    }

    pub fn remove(&mut self, ty: &str) {
        self.0.retain(|c| c.type_ != ty);
    }

    /// Set `ty` from the present members of `parts`: False if any is False (its reason),
    /// else Unknown if any is Unknown, else True. Absent parts do not count.
    pub fn roll_up(&mut self, ty: &str, parts: &[&str]) {
        let present: Vec<Condition> = parts.iter().filter_map(|p| self.get(p).cloned()).collect();
        let first = |s: &str| present.iter().find(|c| c.status == s);
        let (status, src) = match (first("False"), first("Unknown")) {
            (Some(c), _) => (Status::False, Some(c)),
            (None, Some(c)) => (Status::Unknown, Some(c)),
            (None, None) => (Status::True, None),
        };
        let reason = src.and_then(|c| c.reason.clone()).unwrap_or_default();
        let message =
            src.map(|c| format!("{}: {}", c.type_, c.message.clone().unwrap_or_default())).unwrap_or_default();
        self.set(ty, status, &reason, &message);
    }

    /// `WorkloadsReady`, `RouterReady` and `Ready` from their parts.
    pub fn roll_up_all(&mut self) {
        self.roll_up(WORKLOADS_READY, WORKLOAD_PARTS);
        self.roll_up(ROUTER_READY, ROUTER_PARTS);
        self.roll_up(READY, &[PRESETS_COMBINED, WORKLOADS_READY, ROUTER_READY]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_every_dependent_and_reports_the_first_failure() {
        let mut c = Conditions::default();
        c.set(PRESETS_COMBINED, Status::True, "", "");
        c.set(MAIN_WORKLOAD_READY, Status::False, "MinimumReplicasUnavailable", "0/1 available");
        c.set(HTTPROUTES_READY, Status::Unknown, "NotHandled", "routing comes later");
        c.roll_up_all();
        assert_eq!(c.get(WORKLOADS_READY).unwrap().status, "False");
        assert_eq!(c.get(ROUTER_READY).unwrap().status, "Unknown");
        let ready = c.get(READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_deref()), ("False", Some("MinimumReplicasUnavailable")));

        c.set(MAIN_WORKLOAD_READY, Status::True, "", "");
        c.remove(HTTPROUTES_READY);
        c.roll_up_all();
        // Absent router parts: the router is ready.
        assert!(c.is_true(ROUTER_READY) && c.is_true(READY));
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let mut c = Conditions::default();
        c.set(READY, Status::False, "A", "");
        c.0[0].last_transition_time = Some("2020-01-01T00:00:00Z".into());
        c.set(READY, Status::False, "B", "other");
        assert_eq!(c.0[0].last_transition_time.as_deref(), Some("2020-01-01T00:00:00Z"));
        c.set(READY, Status::True, "", "");
        assert_ne!(c.0[0].last_transition_time.as_deref(), Some("2020-01-01T00:00:00Z"));
    }
}
