//! The include stage: `include: [ingestion.yaml, ...]` takes in other pipeline files'
//! params and steps, so a pipeline is composed of smaller ones instead of repeating them.
//! Paths resolve from the including file's folder; included files may include others
//! (a cycle is an error that prints the chain). Included steps come first, in include
//! order; a step name defined twice is an error naming both files. Params merge with the
//! including file winning, then `--set` over all. Problems inside an included file are
//! located in that file.

use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use super::location::NodeKind;
use super::parse;
use super::raw::{RawPipeline, RawStep};
use super::resolve::Resolver;
use super::SourceFile;

/// How deep includes may nest (a cycle is caught sooner; this bounds a long chain).
const MAX_DEPTH: usize = 16;

/// Where a step or param came from: the pipeline file itself or an included one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// The file being loaded.
    Root,
    /// `Resolver::included[i]`.
    Included(usize),
}

impl Resolver<'_> {
    /// Replaces `raw`'s params and steps with the merged ones of it and its includes.
    pub(super) fn include(&mut self, raw: &mut RawPipeline) {
        if raw.include.is_empty() {
            return;
        }
        let mut chain = vec![(canonical(&self.src.path), self.src.path.clone())];
        let (params, steps) = self.merged(raw, Origin::Root, &mut chain);
        raw.params = Some(params);
        raw.steps = steps;
    }

    fn merged(
        &mut self,
        raw: &mut RawPipeline,
        origin: Origin,
        chain: &mut Vec<(PathBuf, PathBuf)>,
    ) -> (
        IndexMap<String, serde_yaml::Value>,
        IndexMap<String, RawStep>,
    ) {
        let mut params = IndexMap::new();
        let mut steps: IndexMap<String, RawStep> = IndexMap::new();
        let mut step_files: IndexMap<String, PathBuf> = IndexMap::new();
        let here = self.source(origin).path.clone();
        // `include: a.yaml` (a scalar) or `include: [a.yaml, ...]`.
        let listed = self.source(origin).index().kind("include") != Some(NodeKind::Scalar);
        for (i, file) in std::mem::take(&mut raw.include).into_iter().enumerate() {
            let key = if listed {
                format!("include.{i}")
            } else {
                "include".to_string()
            };
            let path = here.parent().unwrap_or(Path::new("")).join(&file);
            let seen = canonical(&path);
            if chain.iter().any(|(p, _)| *p == seen) {
                // The whole chain from the file being loaded: where the user started.
                let mut names: Vec<String> = chain
                    .iter()
                    .map(|(_, shown)| shown.display().to_string())
                    .collect();
                names.push(src_path(&path).display().to_string());
                self.error_in(
                    origin,
                    &key,
                    format!("include cycle: {}", names.join(" -> ")),
                    Some("a pipeline cannot include itself, directly or through others".into()),
                );
                continue;
            }
            if chain.len() >= MAX_DEPTH {
                self.error_in(
                    origin,
                    &key,
                    format!("includes nest deeper than {MAX_DEPTH}"),
                    None,
                );
                continue;
            }
            let src = match SourceFile::read(&path, "included pipeline") {
                Ok(src) => src,
                Err(d) => {
                    let message = d.0.first().map(|d| d.message.clone()).unwrap_or_default();
                    self.error_in(
                        origin,
                        &key,
                        format!("include `{file}`: {message}"),
                        Some("include paths are relative to the including file".into()),
                    );
                    continue;
                }
            };
            let mut included = match parse::careful_parse(&src) {
                Ok((included, soft)) => {
                    self.diags.extend(soft);
                    included
                }
                Err(d) => {
                    self.diags.extend(d.0);
                    continue;
                }
            };
            self.included.push(src);
            let inner = Origin::Included(self.included.len() - 1);
            chain.push((seen, src_path(&path)));
            let (inner_params, inner_steps) = self.merged(&mut included, inner, chain);
            chain.pop();
            for (name, value) in inner_params {
                self.param_origin.entry(name.clone()).or_insert(inner);
                params.insert(name, value);
            }
            for (name, step) in inner_steps {
                if let Some(other) = step_files.get(&name) {
                    self.error_in(
                        origin,
                        &key,
                        format!(
                            "step `{name}` is defined both in {} and in {}",
                            other.display(),
                            path.display()
                        ),
                        Some("rename one of them".into()),
                    );
                    continue;
                }
                step_files.insert(name.clone(), path.clone());
                steps.insert(name, step);
            }
        }
        for (name, value) in raw.params.take().into_iter().flatten() {
            self.param_origin.insert(name.clone(), origin);
            params.insert(name, value);
        }
        for (name, step) in std::mem::take(&mut raw.steps) {
            if let Some(other) = step_files.get(&name) {
                self.error_in(
                    origin,
                    &format!("steps.{name}"),
                    format!(
                        "step `{name}` is also defined in included {}",
                        other.display()
                    ),
                    Some("rename one of them".into()),
                );
                continue;
            }
            self.step_origin.insert(name.clone(), origin);
            steps.insert(name, step);
        }
        (params, steps)
    }
}

/// A path as messages show it: `a/./b.yaml` as `a/b.yaml`.
fn src_path(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
