//! `cairn push`, `cairn remote status`, `cairn gc --remote` and `cairn fsck --remote`:
//! the shared cache on object storage, outside a run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::run::runtime;
use super::{human_bytes, print_json, Cli, UsageError};
use crate::engine;
use crate::remote::{Area, Remote, RemoteEntry, TreeKind};
use crate::store::{ObjectDigest, Store};
use crate::util::progress::Progress;

/// `cairn push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Runs whose executed steps to push (ids or unique prefixes).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    runs: Vec<String>,
    /// Push every run in the store.
    #[arg(long)]
    all: bool,
    /// The remote (else $CAIRN_REMOTE).
    #[arg(long, value_name = "URL")]
    remote: Option<String>,
    /// Transfers at once.
    #[arg(long, default_value_t = crate::remote::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `cairn remote`.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// What is only here, only on the remote, and on both.
    Status {
        /// The remote (else $CAIRN_REMOTE).
        #[arg(long, value_name = "URL")]
        remote: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Opens `--remote`, else `$CAIRN_REMOTE`.
pub fn open(url: Option<&str>) -> anyhow::Result<Remote> {
    let url = url
        .map(str::to_string)
        .or_else(|| std::env::var("CAIRN_REMOTE").ok().filter(|u| !u.is_empty()))
        .ok_or_else(|| UsageError("name the remote: --remote URL or $CAIRN_REMOTE".into()))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(Remote::open(&url, &BTreeMap::new()).map_err(|e| UsageError(e.to_string()))?)
}

fn bar(quiet: bool) -> Progress {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return Progress::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Progress::new(bar)
}

/// The remote entries of the steps `runs` executed (or fetched), one per cache key.
fn entries_of_runs(
    store: &Store,
    runs: &[crate::store::RunRecord],
) -> anyhow::Result<Vec<RemoteEntry>> {
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for run in runs {
        // Bound first: the database guard must not live across the loop, whose body
        // takes it again.
        let steps = store.db().run_steps(&run.id)?;
        for step in steps {
            let Some(key) = step.cache_key else { continue };
            if step.outputs.is_empty()
                || !matches!(
                    step.status,
                    crate::store::StepStatus::Ran | crate::store::StepStatus::Cached
                )
                || !step
                    .outputs
                    .values()
                    .all(|o| store.objects().contains(&o.digest))
                || !seen.insert(key)
            {
                continue;
            }
            let mut artifacts = Vec::new();
            for output in step.outputs.values() {
                if let Some(a) = store.db().find_artifact(&output.digest.to_hex())? {
                    artifacts.push(a);
                }
            }
            entries.push(engine::remote_entry(
                key,
                &step.outputs,
                &run.id,
                &step.step,
                &run.pipeline,
                artifacts,
            ));
        }
    }
    Ok(entries)
}

/// `cairn push ...`
pub fn push(cli: &Cli, args: &PushArgs) -> anyhow::Result<ExitCode> {
    let remote = open(args.remote.as_deref())?.with_concurrency(args.concurrency);
    let store = Store::open_existing(&cli.store_dir())?;
    let runs = if args.all {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let page = store.db().list_runs_page(None, None, 500, offset)?;
            offset += page.len();
            let done = page.len() < 500;
            all.extend(page);
            if done {
                break;
            }
        }
        all
    } else {
        args.runs
            .iter()
            .map(|id| {
                store.db().get_run(id)?.ok_or_else(|| {
                    UsageError(format!("no run `{id}` (see `cairn runs ls`)")).into()
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let entries = entries_of_runs(&store, &runs)?;
    let progress = bar(args.json);
    let started = std::time::Instant::now();
    let (stats, written) = runtime()?.block_on(engine::push_to_remote(
        &remote,
        &store,
        &entries,
        progress.clone(),
    ))?;
    progress.bar().finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        print_json(&serde_json::json!({
            "remote": remote.shown(), "entries": entries.len(), "entries_written": written,
            "objects": stats.objects, "bytes": stats.bytes, "skipped": stats.skipped, "seconds": seconds,
        }))?;
    } else {
        println!(
            "pushed {} objects ({}) to {}, {} already there; {} of {} cache entries new ({:.1} s)",
            stats.objects,
            human_bytes(stats.bytes),
            remote.shown(),
            stats.skipped,
            written,
            entries.len(),
            seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cairn remote ...`
pub fn remote(cli: &Cli, cmd: &RemoteCommand) -> anyhow::Result<ExitCode> {
    let RemoteCommand::Status { remote, json } = cmd;
    let remote = open(remote.as_deref())?;
    let store = Store::open_existing(&cli.store_dir())?;
    let local: HashSet<ObjectDigest> = store
        .objects()
        .list()
        .map_err(|e| anyhow::anyhow!("listing local objects: {e}"))?
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    let rt = runtime()?;
    let (remote_objects, entries) = rt.block_on(async {
        let objects = remote.list_objects().await?;
        let entries = remote.list_entries().await?;
        Ok::<_, crate::remote::RemoteError>((objects, entries))
    })?;
    // A folder's files are objects on the remote but not locally: compare what the
    // cache entries and local records name.
    let named: HashSet<ObjectDigest> = entries
        .iter()
        .flat_map(|e| e.outputs.values().map(|o| o.digest))
        .collect();
    let remote_side: HashSet<ObjectDigest> = named
        .iter()
        .copied()
        .filter(|d| remote_objects.contains(d))
        .collect();
    let local_only = local.difference(&remote_side).count();
    let remote_only = remote_side.difference(&local).count();
    let both = local.intersection(&remote_side).count();
    let local_keys = store.db().cache_keys()?;
    let remote_keys: HashSet<_> = entries.iter().map(|e| e.key).collect();
    let entries_local_only = local_keys.difference(&remote_keys).count();
    let entries_remote_only = remote_keys.difference(&local_keys).count();
    if *json {
        print_json(&serde_json::json!({
            "remote": remote.shown(),
            "objects": {"local_only": local_only, "remote_only": remote_only, "both": both},
            "cache_entries": {"local_only": entries_local_only, "remote_only": entries_remote_only,
                              "both": local_keys.intersection(&remote_keys).count()},
        }))?;
    } else {
        println!("remote {}", remote.shown());
        println!("objects:       {local_only} only here, {remote_only} only on the remote, {both} on both");
        println!(
            "cache entries: {entries_local_only} only here (`cairn push --all` uploads them), {entries_remote_only} only on the remote, {} on both",
            local_keys.intersection(&remote_keys).count()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `cairn gc --remote`: deletes remote objects no cache entry needs (left by pushes that
/// were interrupted before their entries were written).
pub fn gc_remote(url: Option<&str>, dry_run: bool) -> anyhow::Result<ExitCode> {
    let remote = open(url)?;
    let rt = runtime()?;
    let (files, trees, bytes) = rt.block_on(async {
        let entries = remote.list_entries().await?;
        let mut keep_trees = BTreeSet::new();
        let mut keep_files = BTreeSet::new();
        for entry in &entries {
            for output in entry.outputs.values() {
                keep_files.insert(output.digest);
                keep_trees.insert(output.digest);
            }
        }
        for digest in keep_trees.clone() {
            if let Some(tree) = remote.tree(&digest).await? {
                keep_files.extend(tree.files().map(|(_, d, _)| d));
            }
        }
        let mut removed = (0usize, 0usize, 0u64);
        for (digest, size) in remote.list_area(Area::Files).await? {
            if !keep_files.contains(&digest) {
                if !dry_run {
                    remote.delete(Area::Files, &digest).await?;
                }
                removed.0 += 1;
                removed.2 += size;
            }
        }
        for (digest, _) in remote.list_area(Area::Trees).await? {
            if !keep_trees.contains(&digest) {
                if !dry_run {
                    remote.delete(Area::Trees, &digest).await?;
                }
                removed.1 += 1;
            }
        }
        Ok::<_, crate::remote::RemoteError>(removed)
    })?;
    println!(
        "{} {files} objects and {trees} folder manifests ({}) on {} that no cache entry needs",
        if dry_run { "would remove" } else { "removed" },
        human_bytes(bytes),
        remote.shown()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cairn fsck --remote`: every cache entry's objects are on the remote, whole (folders:
/// their manifest and every file, at its size). Exit 1 when something is missing.
pub fn fsck_remote(url: Option<&str>) -> anyhow::Result<ExitCode> {
    let remote = open(url)?;
    let rt = runtime()?;
    let (checked, problems) = rt.block_on(async {
        let entries = remote.list_entries().await?;
        let files = remote.list_area(Area::Files).await?;
        let mut problems = Vec::new();
        for entry in &entries {
            for (name, output) in &entry.outputs {
                let is_dir = entry
                    .artifacts
                    .iter()
                    .find(|a| a.digest == output.digest)
                    .is_some_and(|a| a.is_dir);
                let what = format!("{} output `{name}` ({})", entry.step, output.digest.short());
                if !is_dir {
                    if !files.contains_key(&output.digest) {
                        problems.push(format!("{what}: object missing"));
                    }
                    continue;
                }
                match remote.tree(&output.digest).await? {
                    None => problems.push(format!("{what}: folder manifest missing")),
                    Some(tree) => {
                        for entry in &tree.entries {
                            if let TreeKind::File { digest, size, .. } = &entry.kind {
                                if files.get(digest) != Some(size) {
                                    problems.push(format!(
                                        "{what}: file {} missing or truncated",
                                        entry.path
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok::<_, crate::remote::RemoteError>((entries.len(), problems))
    })?;
    for p in &problems {
        println!("problem: {p}");
    }
    println!(
        "checked {checked} cache entries on {}: {} problems",
        remote.shown(),
        problems.len()
    );
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
