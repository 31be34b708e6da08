//! `source`: turns a local file or folder into an artifact. It runs on every pipeline run
//! (the outside world may have changed), but a stat cache (size, mtime, inode) means an
//! unchanged tree is walked, not rehashed, and an unchanged digest is not copied again.

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::Produced;
use super::{Kind, StepContext, StepError, StepOutputs};
use crate::store::stat_cache::{hash_with_stat_cache, Hashed};

/// The `source` step kind.
pub struct SourceStep;

/// Parameters of `source`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceParams {
    /// File or folder to read, relative to the directory cairn runs in.
    pub path: String,
}

/// Name of the one output.
pub const OUTPUT: &str = "data";

#[async_trait]
impl Kind for SourceStep {
    type Params = SourceParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[(OUTPUT, "path")];

    fn name(&self) -> &'static str {
        "source"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Hash a local file or folder into an artifact (output `data`); always checks, rarely rehashes"
    }

    fn volatile(&self) -> bool {
        true
    }

    fn inputs(&self) -> Option<Vec<super::InputDecl>> {
        Some(Vec::new())
    }

    async fn run(
        &self,
        params: &SourceParams,
        ctx: &StepContext,
    ) -> Result<StepOutputs, StepError> {
        let root = ctx.resolve_path(&params.path);
        let root = root.canonicalize().map_err(|e| {
            StepError::Input(format!(
                "source path `{}` cannot be read: {e}",
                root.display()
            ))
        })?;
        let store = ctx.store.clone();
        let progress = ctx.progress.clone();
        tokio::task::spawn_blocking(move || snapshot(&store, &root, &progress))
            .await
            .map_err(|e| StepError::Failed(format!("source hashing panicked: {e}")))?
    }
}

fn snapshot(
    store: &crate::store::Store,
    root: &Path,
    progress: &super::Progress,
) -> Result<StepOutputs, StepError> {
    let root_key = root.to_string_lossy().to_string();
    let Hashed {
        digest,
        files,
        bytes: size,
        rehashed,
    } = hash_with_stat_cache(store, root, progress)
        .map_err(|e| StepError::Failed(e.to_string()))?;
    let is_dir = root.is_dir();
    if !store.objects().is_sealed(&digest) {
        progress.set_message("copying into the store");
        let committed = store.objects().import_copy(root).map_err(|e| {
            StepError::Failed(format!("copying {} into the store: {e}", root.display()))
        })?;
        if committed.digest != digest {
            return Err(StepError::Failed(format!(
                "{} changed while it was being read; run again",
                root.display()
            )));
        }
    }
    let mut outputs = BTreeMap::new();
    outputs.insert(
        OUTPUT.to_string(),
        Produced {
            digest,
            kind: if is_dir { "dir" } else { "file" }.to_string(),
            size,
            is_dir,
            metadata: json!({"path": root_key, "files": files, "bytes": size}),
        },
    );
    Ok(StepOutputs {
        outputs,
        note: Some(format!("{files} files, {rehashed} rehashed")),
    })
}
