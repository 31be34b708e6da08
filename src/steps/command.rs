//! `command`: runs any external program as a step, the way a dvc.yaml stage does.
//! Inputs arrive as read-only store paths, outputs are files or folders the program
//! creates at the paths it is given; both are also exported as environment variables.

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::util::template::{self, value_text, Escapes, Reference, TemplateError};

/// The `command` step kind.
pub struct CommandStep;

/// The program to run.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RunSpec {
    /// A shell script, run with `sh -c`.
    Shell(String),
    /// An argv list, run directly without a shell.
    Argv(Vec<String>),
}

/// Parameters of `command` (under `with:`).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// The program: a string runs through `sh -c`, a list is an argv run directly.
    /// `${inputs.NAME}` and `${outputs.NAME}` become paths; `${params.NAME}` pipeline values.
    pub run: RunSpec,
    /// Extra environment variables for the program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds after which the program is killed and the attempt fails (none: no limit).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Extra attempts after a failure (non-zero exit or timeout).
    #[serde(default)]
    pub retries: u32,
    /// Milliseconds before the first retry; doubles on each retry, with jitter.
    #[serde(default = "default_backoff_ms")]
    pub retry_backoff_ms: u64,
}

fn default_backoff_ms() -> u64 {
    1000
}

/// Output kinds with a fixed shape; any other kind name is accepted as a typed artifact.
const FILE_KIND: &str = "file";
const DIR_KIND: &str = "dir";
const STDERR_TAIL_BYTES: usize = 4096;
const STDERR_TAIL_LINES: usize = 12;

#[async_trait]
impl Kind for CommandStep {
    type Params = CommandParams;

    fn name(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Run an external program; declared outputs are files or folders it creates"
    }

    fn exports_params(&self) -> bool {
        true
    }

    fn validate(&self, p: &CommandParams) -> Vec<ParamIssue> {
        let mut issues = Vec::new();
        if let RunSpec::Argv(argv) = &p.run {
            if argv.is_empty() {
                issues.push(ParamIssue::new(
                    "with.run",
                    "`run` is an empty list: name the program to run",
                ));
            }
        }
        if p.timeout.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
            issues.push(ParamIssue::new(
                "with.timeout",
                "`timeout` must be a positive number of seconds",
            ));
        }
        issues
    }

    /// Whatever the pipeline declares, named in letters, digits, `_` or `-`.
    fn outputs(
        &self,
        declared: &IndexMap<String, String>,
    ) -> Result<IndexMap<String, String>, Vec<ParamIssue>> {
        let mut issues = Vec::new();
        for (name, kind) in declared {
            if !valid_name(name) {
                issues.push(ParamIssue::new(
                    format!("outputs.{name}"),
                    format!("output name `{name}` must be letters, digits, `_` or `-`"),
                ));
            }
            if !valid_name(kind) {
                issues.push(ParamIssue::new(
                    format!("outputs.{name}"),
                    format!("output kind `{kind}` must be `file`, `dir` or an artifact kind name"),
                ));
            }
        }
        if issues.is_empty() {
            Ok(declared.clone())
        } else {
            Err(issues)
        }
    }

    async fn run(
        &self,
        params: &CommandParams,
        ctx: &StepContext,
    ) -> Result<StepOutputs, StepError> {
        let out_dir = ctx.work_dir.join("out");
        let env = environment(ctx, params);
        let program = build_program(ctx, &params.run)?;
        let attempts = params.retries + 1;
        let mut last_error = String::new();
        for attempt in 1..=attempts {
            reset_dir(&out_dir)?;
            if attempt > 1 {
                let backoff = backoff_delay(params.retry_backoff_ms, attempt - 1);
                append_log(
                    ctx,
                    &format!(
                    "\n[cairn] attempt {attempt}/{attempts} after {} ms (previous: {last_error})\n",
                    backoff.as_millis()
                ),
                )
                .await;
                ctx.progress
                    .set_message(format!("retry {}/{}", attempt - 1, params.retries));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
                }
            }
            match run_once(ctx, &program, &env, params.timeout).await {
                Ok(()) => return collect_outputs(ctx),
                Err(StepError::Failed(msg)) => last_error = msg,
                Err(other) => return Err(other),
            }
        }
        if attempts > 1 {
            last_error = format!("failed after {attempts} attempts: {last_error}");
        }
        Err(StepError::Failed(last_error))
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `CAIRN_INPUT_<NAME>` etc.: uppercased, with `-` turned into `_`.
pub fn env_name(prefix: &str, name: &str) -> String {
    format!(
        "CAIRN_{prefix}_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

fn environment(ctx: &StepContext, params: &CommandParams) -> Vec<(String, String)> {
    let mut env = vec![
        ("CAIRN_STEP".to_string(), ctx.step.clone()),
        (
            "CAIRN_WORK_DIR".to_string(),
            ctx.work_dir.display().to_string(),
        ),
    ];
    let mut collections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, input) in &ctx.inputs {
        let path = input.path.display().to_string();
        match collection_of(name) {
            Some(collection) => collections.entry(collection).or_default().push(path),
            None => env.push((env_name("INPUT", name), path)),
        }
    }
    for (name, paths) in collections {
        env.push((env_name("INPUT", name), paths.join("\n")));
    }
    for name in ctx.outputs.keys() {
        env.push((
            env_name("OUTPUT", name),
            ctx.output_path(name).display().to_string(),
        ));
    }
    for (name, value) in &ctx.param_env {
        env.push((env_name("PARAM", name), value_text(value)));
    }
    env.extend(params.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The collection an input belongs to: `models[rank=8]` (one variant of
/// `models: train[*].model`) belongs to `models`.
fn collection_of(input: &str) -> Option<&str> {
    crate::util::variant::split(input).map(|(name, _)| name)
}

/// Single-quotes a path for `sh -c`.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn substitute_paths(ctx: &StepContext, text: &str, quote: bool) -> Result<String, StepError> {
    let mut lookup = |r: &Reference| -> Result<Option<String>, TemplateError> {
        if r.namespace == "inputs" && !ctx.inputs.contains_key(&r.name) {
            let members: Vec<String> = ctx
                .inputs
                .iter()
                .filter(|(name, _)| collection_of(name) == Some(r.name.as_str()))
                .map(|(_, i)| i.path.display().to_string())
                .map(|p| if quote { shell_quote(&p) } else { p })
                .collect();
            if !members.is_empty() {
                return Ok(Some(members.join(" ")));
            }
        }
        let path = match r.namespace.as_str() {
            "inputs" => ctx
                .inputs
                .get(&r.name)
                .map(|i| i.path.display().to_string()),
            "outputs" => ctx
                .outputs
                .contains_key(&r.name)
                .then(|| ctx.output_path(&r.name).display().to_string()),
            "params" => ctx.param_env.get(&r.name).map(value_text),
            _ => None,
        };
        match path {
            Some(p) if quote => Ok(Some(shell_quote(&p))),
            Some(p) => Ok(Some(p)),
            None => Err(TemplateError(format!(
                "`${{{}.{}}}` is not defined for this step",
                r.namespace, r.name
            ))),
        }
    };
    template::substitute(text, Escapes::Unescape, &mut lookup).map_err(|e| StepError::Failed(e.0))
}

fn build_program(ctx: &StepContext, run: &RunSpec) -> Result<Vec<String>, StepError> {
    Ok(match run {
        RunSpec::Shell(script) => vec![
            "sh".to_string(),
            "-c".to_string(),
            substitute_paths(ctx, script, true)?,
        ],
        RunSpec::Argv(argv) => argv
            .iter()
            .map(|a| substitute_paths(ctx, a, false))
            .collect::<Result<_, _>>()?,
    })
}

fn reset_dir(dir: &std::path::Path) -> Result<(), StepError> {
    crate::store::objects::remove_any(dir)
        .and_then(|_| std::fs::create_dir_all(dir))
        .map_err(|e| StepError::Failed(format!("preparing {}: {e}", dir.display())))
}

fn backoff_delay(base_ms: u64, retry: u32) -> Duration {
    let exp = base_ms.saturating_mul(1u64 << retry.min(16)).min(60_000);
    let jitter = if exp > 0 {
        rand::random::<u64>() % (exp / 4 + 1)
    } else {
        0
    };
    Duration::from_millis(exp + jitter)
}

async fn append_log(ctx: &StepContext, text: &str) {
    if let Ok(mut f) = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ctx.log_path)
        .await
    {
        let _ = f.write_all(text.as_bytes()).await;
    }
}

async fn run_once(
    ctx: &StepContext,
    program: &[String],
    env: &[(String, String)],
    timeout: Option<f64>,
) -> Result<(), StepError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ctx.log_path)
        .map_err(|e| StepError::Failed(format!("opening step log: {e}")))?;
    let mut cmd = tokio::process::Command::new(&program[0]);
    cmd.args(&program[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&ctx.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| StepError::Failed(format!("could not start `{}`: {e}", program[0])))?;
    let pgid = child.id().map(|id| id as i32);
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let log_path = ctx.log_path.clone();
    let stderr_task = tokio::spawn(async move {
        let mut tail: VecDeque<u8> = VecDeque::with_capacity(STDERR_TAIL_BYTES);
        // A local append-open is quick; tokio::fs would cost a blocking-pool round trip
        // for every step.
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .ok()
            .map(tokio::fs::File::from_std);
        let mut buf = vec![0u8; 8192];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&buf[..n]).await;
                    }
                    for &b in &buf[..n] {
                        if tail.len() == STDERR_TAIL_BYTES {
                            tail.pop_front();
                        }
                        tail.push_back(b);
                    }
                }
            }
        }
        // tokio's File finishes writes in the background: without a flush the log can
        // still be empty when the step returns (a Slurm node prints it at once).
        if let Some(f) = log.as_mut() {
            let _ = f.flush().await;
        }
        let bytes: Vec<u8> = tail.into_iter().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let limit = timeout.map(Duration::from_secs_f64);
    let waited = tokio::select! {
        status = child.wait() => Some(status),
        _ = sleep_or_forever(limit) => None,
        _ = ctx.cancel.cancelled() => {
            kill_group(pgid);
            let _ = child.wait().await;
            return Err(StepError::Cancelled);
        }
    };
    let status = match waited {
        Some(status) => {
            status.map_err(|e| StepError::Failed(format!("waiting for the program: {e}")))?
        }
        None => {
            kill_group(pgid);
            let _ = child.wait().await;
            let _ = stderr_task.await;
            return Err(StepError::Failed(format!(
                "timed out after {}s (the `timeout` parameter)",
                timeout.unwrap_or_default()
            )));
        }
    };
    // The program may leave children holding stderr open; do not wait on them forever.
    kill_group(pgid);
    let tail = tokio::time::timeout(Duration::from_secs(5), stderr_task)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let what = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "failed".to_string(),
    };
    let lines: Vec<&str> = tail.lines().collect();
    let shown = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n");
    if shown.trim().is_empty() {
        Err(StepError::Failed(format!(
            "`{}` failed with {what} (no stderr)",
            program_label(program)
        )))
    } else {
        Err(StepError::Failed(format!(
            "`{}` failed with {what}; stderr ends with:\n{shown}",
            program_label(program)
        )))
    }
}

fn program_label(program: &[String]) -> String {
    let text = if program.len() == 3 && program[0] == "sh" && program[1] == "-c" {
        program[2].clone()
    } else {
        program.join(" ")
    };
    let first_line = text.lines().next().unwrap_or("").to_string();
    if first_line.chars().count() > 60 {
        format!("{}...", first_line.chars().take(57).collect::<String>())
    } else {
        first_line
    }
}

async fn sleep_or_forever(limit: Option<Duration>) {
    match limit {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending::<()>().await,
    }
}

fn kill_group(pgid: Option<i32>) {
    if let Some(pgid) = pgid {
        // SAFETY: signalling a process group we created; failure (already gone) is fine.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

fn collect_outputs(ctx: &StepContext) -> Result<StepOutputs, StepError> {
    let mut outputs = BTreeMap::new();
    for (name, kind) in &ctx.outputs {
        let path = ctx.output_path(name);
        let meta = std::fs::symlink_metadata(&path).map_err(|_| {
            StepError::Failed(format!(
                "the program exited 0 but did not create declared output `{name}` (expected at ${{outputs.{name}}} = {})",
                path.display()
            ))
        })?;
        if kind == FILE_KIND && !meta.is_file() {
            return Err(StepError::Failed(format!(
                "output `{name}` is declared `file` but the program made a directory"
            )));
        }
        if kind == DIR_KIND && !meta.is_dir() {
            return Err(StepError::Failed(format!(
                "output `{name}` is declared `dir` but the program made a file"
            )));
        }
        outputs.insert(
            name.clone(),
            ctx.commit_output(name, Value::Object(Default::default()))?,
        );
    }
    Ok(StepOutputs {
        outputs,
        note: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::steps::Step;

    #[test]
    fn quoting_keeps_paths_intact() {
        assert_eq!(shell_quote("/a/b.txt"), "/a/b.txt");
        assert_eq!(shell_quote("it's here"), r"'it'\''s here'");
        assert_eq!(env_name("INPUT", "raw-text"), "CAIRN_INPUT_RAW_TEXT");
    }

    #[test]
    fn backoff_grows() {
        assert!(backoff_delay(100, 3) >= Duration::from_millis(800));
        assert!(backoff_delay(100, 1) < Duration::from_millis(300));
    }

    #[test]
    fn check_reports_bad_params() {
        let step = super::super::Typed(CommandStep);
        let issues = step
            .bind(
                &serde_json::json!({"run": "x", "retris": 2}),
                &IndexMap::new(),
            )
            .unwrap_err();
        assert_eq!(issues[0].help.as_deref(), Some("did you mean `retries`?"));
        let issues = step
            .bind(&serde_json::json!({}), &IndexMap::new())
            .unwrap_err();
        assert!(
            issues[0].message.contains("missing field `run`"),
            "{issues:?}"
        );
    }
}
