//! OpenLineage export: a run as the standard run events (spec 2-0-2) a lineage server
//! (Marquez, DataHub) ingests. The pipeline run is one job run (`START`, then `COMPLETE`,
//! `FAIL` or `ABORT`); each step that ran, was cached or failed is a child job run
//! (`PIPELINE.STEP`, with the `parent` run facet) whose inputs and outputs are datasets
//! named by their blake3 digests, so the same artifact is the same dataset in every run
//! and pipeline. Run ids are UUIDs derived from cairn's run id (and step), so exporting
//! twice gives the same events and a server deduplicates them. Error messages are
//! redacted like everywhere else.

use serde_json::{json, Value};

use crate::store::{RunRecord, RunStatus, StepRecord, StepStatus};

/// The `producer` of every event and facet (a URI, as the spec asks).
pub const PRODUCER: &str = concat!("urn:cairn:", env!("CARGO_PKG_VERSION"));
const RUN_EVENT: &str = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent";
const PARENT_FACET: &str =
    "https://openlineage.io/spec/facets/1-2-0/ParentRunFacet.json#/$defs/ParentRunFacet";
const JOB_TYPE_FACET: &str =
    "https://openlineage.io/spec/facets/2-0-4/JobTypeJobFacet.json#/$defs/JobTypeJobFacet";
const ERROR_FACET: &str = "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json#/$defs/ErrorMessageRunFacet";

/// The events of one run, in time order: the pipeline's START, each step's START and
/// end, the pipeline's end (absent while the run is still going).
pub fn run_events(namespace: &str, run: &RunRecord, steps: &[StepRecord]) -> Vec<Value> {
    let pipeline_run = uuid_for(&[&run.id]);
    let pipeline_job = json!({"namespace": namespace, "name": run.pipeline});
    let mut events = vec![event(
        "START",
        &run.started_at,
        json!({"runId": pipeline_run, "facets": {}}),
        job(namespace, &run.pipeline, "DAG"),
        &[],
        &[],
    )];
    for step in steps {
        if !matches!(
            step.status,
            StepStatus::Ran | StepStatus::Cached | StepStatus::Failed
        ) {
            continue;
        }
        let name = format!("{}.{}", run.pipeline, step.step);
        let run_id = uuid_for(&[&run.id, &step.step]);
        let parent = json!({
            "parent": {
                "_producer": PRODUCER,
                "_schemaURL": PARENT_FACET,
                "run": {"runId": pipeline_run},
                "job": pipeline_job,
            }
        });
        let inputs: Vec<String> = step.inputs.values().map(|i| i.digest.to_hex()).collect();
        let outputs: Vec<String> = step.outputs.values().map(|o| o.digest.to_hex()).collect();
        let started = &step.started_at;
        events.push(event(
            "START",
            started,
            json!({"runId": run_id, "facets": parent}),
            job(namespace, &name, "TASK"),
            &inputs,
            &[],
        ));
        let mut facets = parent;
        let end_type = if step.status == StepStatus::Failed {
            let message = step.error.clone().unwrap_or_else(|| step.reason.clone());
            facets["errorMessage"] = json!({
                "_producer": PRODUCER,
                "_schemaURL": ERROR_FACET,
                "message": crate::redact::redact_text(&message),
                "programmingLanguage": "rust",
            });
            "FAIL"
        } else {
            "COMPLETE"
        };
        events.push(event(
            end_type,
            &plus_ms(started, step.duration_ms),
            json!({"runId": run_id, "facets": facets}),
            job(namespace, &name, "TASK"),
            &inputs,
            &outputs,
        ));
    }
    let end = match run.status {
        RunStatus::Succeeded => Some("COMPLETE"),
        RunStatus::Failed => Some("FAIL"),
        RunStatus::Cancelled | RunStatus::Interrupted => Some("ABORT"),
        _ => None,
    };
    if let (Some(end), Some(finished)) = (end, &run.finished_at) {
        events.push(event(
            end,
            finished,
            json!({"runId": pipeline_run, "facets": {}}),
            job(namespace, &run.pipeline, "DAG"),
            &[],
            &[],
        ));
    }
    events
}

fn job(namespace: &str, name: &str, job_type: &str) -> Value {
    json!({
        "namespace": namespace,
        "name": name,
        "facets": {
            "jobType": {
                "_producer": PRODUCER,
                "_schemaURL": JOB_TYPE_FACET,
                "processingType": "BATCH",
                "integration": "CAIRN",
                "jobType": job_type,
            }
        }
    })
}

fn event(
    event_type: &str,
    time: &str,
    run: Value,
    job: Value,
    inputs: &[String],
    outputs: &[String],
) -> Value {
    let datasets = |digests: &[String]| -> Value {
        digests
            .iter()
            .map(|d| json!({"namespace": "cairn", "name": format!("blake3:{d}"), "facets": {}}))
            .collect()
    };
    json!({
        "eventType": event_type,
        "eventTime": time,
        "producer": PRODUCER,
        "schemaURL": RUN_EVENT,
        "run": run,
        "job": job,
        "inputs": datasets(inputs),
        "outputs": datasets(outputs),
    })
}

/// A UUID (version 5 layout) from blake3 over the parts: stable for the same run.
fn uuid_for(parts: &[&str]) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"cairn-openlineage-run\0");
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// An RFC 3339 time plus milliseconds (the time itself when it does not parse).
fn plus_ms(time: &str, ms: u64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(time, &Rfc3339)
        .ok()
        .and_then(|t| {
            (t + time::Duration::milliseconds(ms as i64))
                .format(&Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| time.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_stable_uuids() {
        let a = uuid_for(&["20261201-000000-abcdef", "train"]);
        assert_eq!(a, uuid_for(&["20261201-000000-abcdef", "train"]));
        assert_ne!(a, uuid_for(&["20261201-000000-abcdef", "eval"]));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(
            plus_ms("2026-12-01T00:00:00Z", 1500),
            "2026-12-01T00:00:01.5Z"
        );
    }
}
