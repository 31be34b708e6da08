//! The Slurm executor. The cache decision stays on the submitting machine; a step that
//! must run is written out as a job description in its work folder, submitted with
//! `sbatch --parsable` as a batch script that runs the same `cairn` binary on the node
//! (`cairn internal run-step DESCRIPTION`, which executes exactly that step against the
//! shared store and writes its result next to the description), and watched with
//! `squeue` (polling every 0.1 s, then 0.2 s for the first 30 s, then up to 2 s) until it leaves the queue; its end state is read from
//! `scontrol show job` (or `sacct` where accounting keeps it). The job's stdout and stderr
//! are the step's log. Outcomes map to step failures with reasons (FAILED with its exit
//! code, TIMEOUT, OUT_OF_MEMORY or a memory kill slurmstepd logged, CANCELLED); NODE_FAIL
//! and PREEMPTED are resubmitted up to
//! `retries`; cancelling the run `scancel`s the job. The store must be on a filesystem
//! the nodes share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::pipeline::raw::RawResources;
use crate::steps::{InputArtifact, Produced, StepContext, StepError, StepOutputs};
use crate::store::{Access, CacheKey, ObjectDigest, Store};

/// What the node needs to execute one step.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobDescription {
    /// The pipeline file (absolute).
    pub pipeline: PathBuf,
    /// `--set` values of the run.
    pub sets: Vec<String>,
    /// Where relative paths resolve.
    pub cwd: PathBuf,
    /// The step.
    pub step: String,
    /// The shared store.
    pub store: PathBuf,
    /// The step's work folder (in the store's tmp/).
    pub work_dir: PathBuf,
    /// Its cache key.
    pub cache_key: CacheKey,
    /// Input artifacts by name: digest and kind.
    pub inputs: BTreeMap<String, (ObjectDigest, String)>,
    /// Where the node writes the [`JobResult`].
    pub result: PathBuf,
}

/// What the node reports back.
#[derive(Debug, Serialize, Deserialize)]
pub enum JobResult {
    /// The step succeeded; its outputs are in the store.
    Done {
        /// Outputs by name.
        outputs: BTreeMap<String, Produced>,
        /// The step's note.
        note: Option<String>,
    },
    /// The step failed.
    Failed {
        /// Why.
        message: String,
        /// Whether its input was at fault.
        input: bool,
    },
}

/// Runs the step described by `ctx` as a Slurm job and waits for it.
pub async fn run(
    ctx: &StepContext,
    pipeline: &Path,
    sets: &[String],
    resources: &RawResources,
) -> Result<StepOutputs, StepError> {
    let description = JobDescription {
        pipeline: absolute(&ctx.cwd, pipeline),
        sets: sets.to_vec(),
        cwd: ctx.cwd.clone(),
        step: ctx.step.clone(),
        store: ctx.store.root().to_path_buf(),
        work_dir: ctx.work_dir.clone(),
        cache_key: ctx.cache_key,
        inputs: ctx
            .inputs
            .iter()
            .map(|(name, i)| (name.clone(), (i.digest, i.kind.clone())))
            .collect(),
        result: ctx.work_dir.join("slurm-result.json"),
    };
    let desc_path = ctx.work_dir.join("slurm-job.json");
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes)
            .map_err(|e| StepError::Failed(format!("writing {}: {e}", path.display())))
    };
    write(
        &desc_path,
        &serde_json::to_vec_pretty(&description).map_err(|e| StepError::Failed(e.to_string()))?,
    )?;
    let exe = std::env::current_exe()
        .map_err(|e| StepError::Failed(format!("finding the cairn binary: {e}")))?;
    let script = ctx.work_dir.join("slurm-job.sh");
    write(
        &script,
        format!(
            "#!/bin/sh\n# cairn step `{}`\nexec {} internal run-step {}\n",
            ctx.step,
            shell_quote(&exe.display().to_string()),
            shell_quote(&desc_path.display().to_string())
        )
        .as_bytes(),
    )?;
    let retries = resources.retries.unwrap_or(1);
    let mut attempt = 0;
    loop {
        let _ = std::fs::remove_file(&description.result);
        let id = submit(ctx, &script, resources).await?;
        ctx.progress.set_message(format!("slurm job {id}: queued"));
        let end = watch(&id, &ctx.cancel, ctx, &description.result).await?;
        let retry = matches!(end.state.as_str(), "NODE_FAIL" | "PREEMPTED") && attempt < retries;
        if retry {
            attempt += 1;
            append_log(
                ctx,
                &format!(
                    "cairn: slurm job {id} ended {}; resubmitting (attempt {})\n",
                    end.state,
                    attempt + 1
                ),
            );
            continue;
        }
        return outcome(ctx, &id, &end, resources, &description.result);
    }
}

/// How a job ended.
struct JobEnd {
    state: String,
    exit_code: String,
    reason: String,
}

/// The `sbatch` options a step's `resources` ask for (only those set).
fn resource_flags(resources: &RawResources) -> Vec<String> {
    let mut args = Vec::new();
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            args.push(format!("--{name}={v}"));
        }
    };
    flag("partition", resources.partition.clone());
    flag("account", resources.account.clone());
    flag("qos", resources.qos.clone());
    flag("constraint", resources.constraint.clone());
    flag("cpus-per-task", resources.cpus.map(|c| c.to_string()));
    flag("mem", resources.mem.clone());
    flag("time", resources.time.clone());
    flag("gres", resources.gpus.map(|g| format!("gpu:{g}")));
    args
}

async fn submit(
    ctx: &StepContext,
    script: &Path,
    resources: &RawResources,
) -> Result<String, StepError> {
    let mut args: Vec<String> = vec![
        "--parsable".into(),
        format!("--job-name=cairn-{}", ctx.step),
        format!("--output={}", ctx.log_path.display()),
        format!("--error={}", ctx.log_path.display()),
        format!("--chdir={}", ctx.cwd.display()),
    ];
    args.extend(resource_flags(resources));
    args.push(script.display().to_string());
    let out = tokio::process::Command::new("sbatch")
        .args(&args)
        .output()
        .await
        .map_err(|e| {
            StepError::Failed(format!(
                "cannot run sbatch ({e}): is Slurm installed here, and SLURM_CONF set if needed?"
            ))
        })?;
    if !out.status.success() {
        return Err(StepError::Failed(format!(
            "sbatch refused the job: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(StepError::Failed(format!(
            "sbatch printed no job id: {text}"
        )));
    }
    Ok(id)
}

/// Polls until job `id` leaves the queue (with backoff), `scancel`ing it on
/// cancellation; then reads how it ended.
async fn watch(
    id: &str,
    cancel: &CancellationToken,
    ctx: &StepContext,
    result: &Path,
) -> Result<JobEnd, StepError> {
    let mut delay = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    let mut last = String::new();
    loop {
        let state = squeue_state(id).await;
        match state {
            // COMPLETING: the job's processes have ended (its result is written); the
            // node is still cleaning up, which the step need not wait for.
            Some(state) if state == "COMPLETING" || FINAL_STATES.contains(&state.as_str()) => break,
            Some(state) => {
                if state != last {
                    ctx.progress
                        .set_message(format!("slurm job {id}: {}", state.to_lowercase()));
                    last = state;
                }
            }
            None => break,
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tokio::process::Command::new("scancel").arg(id).status().await;
                // Wait until it is gone, so nothing keeps writing into the work folder.
                for _ in 0..100 {
                    if squeue_state(id).await.is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                return Err(StepError::Cancelled);
            }
            _ = tokio::time::sleep(delay) => {}
        }
        // Short jobs are noticed within a fifth of a second; long ones cost the controller a
        // query every two seconds at most.
        let cap = if waited < Duration::from_secs(30) {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        waited += delay;
        delay = (delay * 2).min(cap);
    }
    Ok(job_end(id, result).await)
}

/// The job's state while `squeue` lists it.
async fn squeue_state(id: &str) -> Option<String> {
    let out = tokio::process::Command::new("squeue")
        .args(["-h", "-j", id, "-o", "%T"])
        .output()
        .await
        .ok()?;
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !state.is_empty()).then_some(state)
}

/// States a job does not leave.
const FINAL_STATES: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
];

/// How a finished job ended: `scontrol show job` (kept for MinJobAge), else `sacct`.
/// A job still completing (its batch script has exited; the node is cleaning up) is
/// asked again until its final state is known, unless it already exited 0 having
/// reported success in `result`: Slurm can only call that COMPLETED, and the clean-up
/// (epilog, process reaping) takes a second or more that the step need not wait for.
async fn job_end(id: &str, result: &Path) -> JobEnd {
    for _ in 0..300 {
        let mut end = job_end_once(id).await;
        let done = || matches!(read_result(result), Some(JobResult::Done { .. }));
        if let Some(state) = settled_state(&end.state, &end.exit_code, done) {
            end.state = state.to_string();
            return end;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    job_end_once(id).await
}

/// The state to record for a job Slurm reports as `state`, or `None` while it must be
/// asked again: a COMPLETING job counts as COMPLETED once it exited 0 and `reported_done`.
fn settled_state<'a>(
    state: &'a str,
    exit_code: &str,
    reported_done: impl FnOnce() -> bool,
) -> Option<&'a str> {
    match state {
        "COMPLETING" if exit_code == "0:0" && reported_done() => Some("COMPLETED"),
        "COMPLETING" => None,
        _ => Some(state),
    }
}

/// The [`JobResult`] the job wrote to `result`, if it wrote a whole one.
fn read_result(result: &Path) -> Option<JobResult> {
    let bytes = std::fs::read(result).ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn job_end_once(id: &str) -> JobEnd {
    if let Ok(out) = tokio::process::Command::new("scontrol")
        .args(["show", "job", id, "-o"])
        .output()
        .await
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        if let Some(state) = field("JobState") {
            return JobEnd {
                state,
                exit_code: field("ExitCode").unwrap_or_default(),
                reason: field("Reason").unwrap_or_default(),
            };
        }
    }
    if let Ok(out) = tokio::process::Command::new("sacct")
        .args(["-j", id, "-n", "-P", "-X", "-o", "State,ExitCode"])
        .output()
        .await
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some((state, code)) = text.lines().next().and_then(|l| l.split_once('|')) {
            return JobEnd {
                state: state.split_whitespace().next().unwrap_or(state).to_string(),
                exit_code: code.to_string(),
                reason: String::new(),
            };
        }
    }
    JobEnd {
        state: "UNKNOWN".into(),
        exit_code: String::new(),
        reason: "neither scontrol nor sacct knows the job any more".into(),
    }
}

fn outcome(
    ctx: &StepContext,
    id: &str,
    end: &JobEnd,
    resources: &RawResources,
    result: &Path,
) -> Result<StepOutputs, StepError> {
    let reported = read_result(result);
    let log = std::fs::read_to_string(&ctx.log_path).unwrap_or_default();
    let tail = log_tail(&log);
    let state = if ran_out_of_memory(&end.state, &log) {
        "OUT_OF_MEMORY"
    } else {
        end.state.as_str()
    };
    // Slurm's verdict comes before what the job wrote: a job killed at its time limit or
    // for memory gets SIGTERM first and reports itself "cancelled", which hides the cause.
    match (state, reported) {
        ("COMPLETED", Some(JobResult::Done { outputs, note })) => Ok(StepOutputs {
            outputs,
            note: Some(match note {
                Some(n) => format!("slurm job {id}; {n}"),
                None => format!("slurm job {id}"),
            }),
        }),
        ("TIMEOUT", _) => Err(StepError::Failed(format!(
            "slurm job {id} hit its time limit (TIMEOUT; resources.time: {}){tail}",
            resources
                .time
                .as_deref()
                .unwrap_or("the partition's default")
        ))),
        ("OUT_OF_MEMORY", _) => Err(StepError::Failed(format!(
            "slurm job {id} ran out of memory (OUT_OF_MEMORY; resources.mem: {}){tail}",
            resources
                .mem
                .as_deref()
                .unwrap_or("the partition's default")
        ))),
        ("CANCELLED", _) => Err(StepError::Failed(format!(
            "slurm job {id} was cancelled outside cairn (CANCELLED {}){tail}",
            end.reason
        ))),
        (_, Some(JobResult::Failed { message, input })) => {
            let message = format!("{message} (slurm job {id})");
            Err(if input {
                StepError::Input(message)
            } else {
                StepError::Failed(message)
            })
        }
        (state, _) => Err(StepError::Failed(format!(
            "slurm job {id} ended {state} with exit code {}{}{tail}",
            end.exit_code,
            if end.reason.is_empty() || end.reason == "None" {
                String::new()
            } else {
                format!(" ({})", end.reason)
            }
        ))),
    }
}

/// Whether the job was killed for memory. With cgroup enforcement Slurm says
/// OUT_OF_MEMORY; with `JobAcctGatherParams=OverMemoryKill` (clusters without cgroups) it
/// says FAILED or CANCELLED and only slurmstepd's line in the job's log tells why.
fn ran_out_of_memory(state: &str, log: &str) -> bool {
    state == "OUT_OF_MEMORY"
        || (matches!(state, "FAILED" | "CANCELLED")
            && log.lines().any(|line| {
                line.starts_with("slurmstepd")
                    && (line.contains("Exceeded job memory limit")
                        || line.contains("exceeded memory limit")
                        || line.contains("oom-kill event"))
            }))
}

fn log_tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!(
        "; log ends with:\n{}",
        crate::redact::redact_text(&tail.join("\n"))
    )
}

fn append_log(ctx: &StepContext, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ctx.log_path)
    {
        let _ = f.write_all(text.as_bytes());
    }
}

fn absolute(cwd: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// On the node: executes the step `description` names and writes its [`JobResult`].
/// `Err` only when the description itself cannot be used.
pub async fn run_here(description: &Path) -> anyhow::Result<bool> {
    let desc: JobDescription = serde_json::from_slice(&std::fs::read(description)?)?;
    std::env::set_current_dir(&desc.cwd)?;
    let result = execute(&desc).await;
    let ok = matches!(result, JobResult::Done { .. });
    let tmp = desc.result.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&result)?)?;
    std::fs::rename(&tmp, &desc.result)?;
    Ok(ok)
}

async fn execute(desc: &JobDescription) -> JobResult {
    let failed = |message: String| JobResult::Failed {
        message,
        input: false,
    };
    let pipeline = match crate::pipeline::load(&desc.pipeline, &desc.sets) {
        Ok(p) => p,
        Err(d) => return failed(format!("the node could not load the pipeline:\n{d}")),
    };
    let Some(step) = pipeline.steps.iter().find(|s| s.name == desc.step) else {
        return failed(format!(
            "pipeline {} has no step `{}` on the node",
            desc.pipeline.display(),
            desc.step
        ));
    };
    let store = match Store::open(&desc.store, Access::Shared) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            return failed(format!(
                "opening the shared store {}: {e}",
                desc.store.display()
            ))
        }
    };
    let inputs = desc
        .inputs
        .iter()
        .map(|(name, (digest, kind))| {
            (
                name.clone(),
                InputArtifact {
                    digest: *digest,
                    kind: kind.clone(),
                    path: store.object_path(digest),
                },
            )
        })
        .collect();
    let cancel = CancellationToken::new();
    // scancel sends SIGTERM: stop the step's work (its child processes included).
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            term.recv().await;
            cancel.cancel();
        });
    }
    let ctx = StepContext {
        step: step.name.clone(),
        cache_key: desc.cache_key,
        param_env: step.param_env.clone(),
        inputs,
        outputs: step.outputs.clone(),
        previous: None,
        log_path: desc.work_dir.join("step-log.txt"),
        work_dir: desc.work_dir.clone(),
        cwd: desc.cwd.clone(),
        docstore_uri: pipeline.docstore_uri.clone(),
        store: store.clone(),
        progress: crate::util::progress::Progress::hidden(),
        cancel,
    };
    let result = match super::schedule::verify_inputs_of(&ctx).await {
        Ok(()) => step.implementation.run(&step.bound, &ctx).await,
        Err(e) => Err(e),
    };
    // What a command step logged goes to the job's output, which is the step's log.
    if let Ok(text) = std::fs::read_to_string(&ctx.log_path) {
        print!("{text}");
    }
    let _ = store.objects().seal_pending();
    match result {
        Ok(outputs) => JobResult::Done {
            outputs: outputs.outputs,
            note: outputs.note,
        },
        Err(e) => JobResult::Failed {
            input: matches!(e, StepError::Input(_)),
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{ran_out_of_memory, resource_flags, settled_state};
    use crate::pipeline::raw::RawResources;

    #[test]
    fn a_gpu_step_asks_sbatch_for_its_partition_and_gpus() {
        let gpu = RawResources {
            gpus: Some(2),
            cpus: Some(8),
            mem: Some("64G".into()),
            time: Some("04:00:00".into()),
            partition: Some("gpu".into()),
            account: Some("twin".into()),
            qos: Some("high".into()),
            constraint: Some("a100".into()),
            retries: Some(3),
        };
        assert_eq!(
            resource_flags(&gpu),
            [
                "--partition=gpu",
                "--account=twin",
                "--qos=high",
                "--constraint=a100",
                "--cpus-per-task=8",
                "--mem=64G",
                "--time=04:00:00",
                "--gres=gpu:2"
            ]
        );
        assert!(resource_flags(&RawResources::default()).is_empty());
    }

    #[test]
    fn a_completing_job_counts_as_completed_only_after_a_clean_exit_and_a_reported_success() {
        assert_eq!(
            settled_state("COMPLETING", "0:0", || true),
            Some("COMPLETED")
        );
        // Killed by a signal (time limit, memory) or failed: wait for Slurm's verdict.
        assert_eq!(settled_state("COMPLETING", "0:15", || true), None);
        assert_eq!(settled_state("COMPLETING", "1:0", || true), None);
        assert_eq!(settled_state("COMPLETING", "0:0", || false), None);
        assert_eq!(settled_state("TIMEOUT", "0:15", || true), Some("TIMEOUT"));
        assert_eq!(
            settled_state("COMPLETED", "0:0", || false),
            Some("COMPLETED")
        );
    }

    #[test]
    fn memory_kills_are_told_apart_from_other_failures() {
        let killed = "going\nslurmstepd-vm: error: StepId=11.batch exceeded memory limit (329732096 > 52428800), being killed\n";
        assert!(ran_out_of_memory("FAILED", killed));
        assert!(ran_out_of_memory("CANCELLED", killed));
        assert!(ran_out_of_memory("OUT_OF_MEMORY", ""));
        assert!(!ran_out_of_memory("TIMEOUT", killed));
        // The step's own output saying so is not Slurm's verdict.
        assert!(!ran_out_of_memory("FAILED", "Exceeded job memory limit\n"));
        assert!(!ran_out_of_memory("FAILED", "exit 3\n"));
    }
}
