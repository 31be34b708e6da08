//! The pipeline and step-spec files as written (the "raw" stage): serde types that
//! mirror the YAML, before any substitution or checking across steps.

use indexmap::IndexMap;
use serde::Deserialize;

/// Top-level keys of a pipeline file.
pub const PIPELINE_KEYS: &[&str] = &[
    "name",
    "description",
    "include",
    "params",
    "docstore",
    "remote",
    "remote_options",
    "executor",
    "steps",
];
/// Keys of a step entry.
pub const STEP_KEYS: &[&str] = &[
    "uses",
    "description",
    "foreach",
    "matrix",
    "when",
    "executor",
    "resources",
    "inputs",
    "with",
    "outputs",
];
/// Top-level keys of a step-spec file.
pub const SPEC_KEYS: &[&str] = &[
    "name",
    "description",
    "inputs",
    "outputs",
    "params",
    "run",
    "env",
    "timeout",
    "retries",
    "retry_backoff_ms",
];

/// A pipeline file, its steps still YAML values (`S`) or typed ([`RawStep`]). Unknown keys
/// are reported from the location index (all at once, with suggestions), so serde
/// ignores them here instead of stopping at the first.
#[derive(Debug, Deserialize)]
pub struct RawPipeline<S = RawStep> {
    /// Pipeline name (runs are grouped by it).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Pipeline files whose params and steps this one takes in (paths relative to this
    /// file); its own params override theirs.
    #[serde(default, deserialize_with = "one_or_many")]
    pub include: Vec<String>,
    /// Pipeline parameters, referenced as `${params.NAME}`.
    #[serde(default)]
    pub params: Option<IndexMap<String, serde_yaml::Value>>,
    /// Where document-store steps write (default: the embedded store).
    #[serde(default)]
    pub docstore: Option<RawDocstore>,
    /// A shared cache on object storage (`s3://bucket/prefix`).
    #[serde(default)]
    pub remote: Option<String>,
    /// Options of the remote (object_store keys such as `aws_endpoint`, `aws_region`).
    #[serde(default)]
    pub remote_options: Option<std::collections::BTreeMap<String, String>>,
    /// Where steps execute by default: `{kind: local}` (default) or `{kind: slurm, ...}`.
    #[serde(default)]
    pub executor: Option<RawExecutor>,
    /// Steps by name. The careful path deserializes each on its own so that type errors
    /// in several steps are all reported.
    pub steps: IndexMap<String, S>,
}

impl<S> RawPipeline<S> {
    /// The same pipeline with other steps.
    pub fn with_steps<T>(self, steps: IndexMap<String, T>) -> RawPipeline<T> {
        RawPipeline {
            name: self.name,
            description: self.description,
            include: self.include,
            params: self.params,
            docstore: self.docstore,
            remote: self.remote,
            remote_options: self.remote_options,
            executor: self.executor,
            steps,
        }
    }
}

/// The pipeline's document store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocstore {
    /// `mongodb://...`, `sqlite:PATH`, or absent for the embedded store.
    #[serde(default)]
    pub uri: Option<String>,
}

/// A step entry. Unknown keys are refused here: the careful path reports them from the
/// location index and removes them before deserializing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    /// Step kind, or a spec file path (`./steps/x.yaml`).
    pub uses: String,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// One step per item of a list (or a `${params.NAME}` holding one): `step[item]`.
    #[serde(default)]
    pub foreach: Option<serde_yaml::Value>,
    /// One step per combination of these lists: `step[rank=8,lr=1e-4]`.
    #[serde(default, deserialize_with = "unique_keys")]
    pub matrix: Option<IndexMap<String, serde_yaml::Value>>,
    /// A condition (`true`, `${params.use_dpo}`, `${params.objective} == dpo`): when it
    /// is false the step is shown as skipped and not run.
    #[serde(default)]
    pub when: Option<serde_yaml::Value>,
    /// Where this step executes: `local` or `slurm` (default: the pipeline's executor).
    #[serde(default)]
    pub executor: Option<String>,
    /// What a Slurm job of this step asks for (over the pipeline executor's defaults).
    #[serde(default)]
    pub resources: Option<RawResources>,
    /// Input name -> `step.output`.
    #[serde(default, deserialize_with = "unique_keys")]
    pub inputs: Option<IndexMap<String, String>>,
    /// Parameters of the step kind.
    #[serde(default, rename = "with", deserialize_with = "unique_keys")]
    pub with: Option<IndexMap<String, serde_yaml::Value>>,
    /// Output name -> kind (for `command` steps); a list of names declares files, as
    /// DVC users write `outs:`.
    #[serde(default, deserialize_with = "outputs_map_or_list")]
    pub outputs: Option<IndexMap<String, String>>,
}

/// `include: a.yaml` or `include: [a.yaml, b.yaml]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(file)) => vec![file],
        Some(OneOrMany::Many(files)) => files,
    })
}

/// The pipeline's executor.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawExecutor {
    /// `local` or `slurm`.
    pub kind: String,
    /// Defaults for every Slurm job of the pipeline.
    #[serde(flatten)]
    pub defaults: RawResources,
}

/// What a Slurm job asks for; all optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    /// GPUs (`--gres=gpu:N`).
    #[serde(default)]
    pub gpus: Option<u32>,
    /// CPUs (`--cpus-per-task`).
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Memory (`--mem`, e.g. `64G`).
    #[serde(default)]
    pub mem: Option<String>,
    /// Time limit (`--time`, e.g. `04:00:00`).
    #[serde(default)]
    pub time: Option<String>,
    /// Partition.
    #[serde(default)]
    pub partition: Option<String>,
    /// Account.
    #[serde(default)]
    pub account: Option<String>,
    /// Quality of service.
    #[serde(default)]
    pub qos: Option<String>,
    /// Node features (`--constraint`).
    #[serde(default)]
    pub constraint: Option<String>,
    /// Resubmissions after a node failure or preemption (default 1).
    #[serde(default)]
    pub retries: Option<u32>,
}

impl RawResources {
    /// These values over `defaults`.
    pub fn over(&self, defaults: &RawResources) -> RawResources {
        RawResources {
            gpus: self.gpus.or(defaults.gpus),
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            partition: self
                .partition
                .clone()
                .or_else(|| defaults.partition.clone()),
            account: self.account.clone().or_else(|| defaults.account.clone()),
            qos: self.qos.clone().or_else(|| defaults.qos.clone()),
            constraint: self
                .constraint
                .clone()
                .or_else(|| defaults.constraint.clone()),
            retries: self.retries.or(defaults.retries),
        }
    }
}

/// The kind of an output declared by name alone (`outputs: [out]`).
pub const DEFAULT_OUTPUT_KIND: &str = "file";

/// `outputs: {out: file, model: dir}` or `outputs: [out, report]` (files).
fn outputs_map_or_list<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<IndexMap<String, String>>, D::Error> {
    struct Outputs;

    impl<'de> serde::de::Visitor<'de> for Outputs {
        type Value = Option<IndexMap<String, String>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of output name to kind (`outputs: {out: file}`) or a list of names (`outputs: [out]`, files)")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            collect_unique(map).map(Some)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = IndexMap::new();
            while let Some(name) = seq.next_element::<String>()? {
                if out.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "output `{name}` is listed twice"
                    )));
                }
                out.insert(name, DEFAULT_OUTPUT_KIND.to_string());
            }
            Ok(Some(out))
        }
    }

    deserializer.deserialize_any(Outputs)
}

fn duplicate<E: serde::de::Error>(key: &str) -> E {
    E::custom(format!("duplicate key `{key}`"))
}

/// The entries of a mapping, refusing a key seen twice.
fn collect_unique<'de, A, V>(mut map: A) -> Result<IndexMap<String, V>, A::Error>
where
    A: serde::de::MapAccess<'de>,
    V: Deserialize<'de>,
{
    let mut out = IndexMap::with_capacity(map.size_hint().unwrap_or(0));
    while let Some(key) = map.next_key::<String>()? {
        if out.contains_key(&key) {
            return Err(duplicate(&key));
        }
        let value = map.next_value()?;
        out.insert(key, value);
    }
    Ok(out)
}

/// A mapping whose keys must be unique: serde fills an `IndexMap` last-wins, and the quick
/// path, which has no location index, must not accept what the careful one reports.
pub(super) fn unique_keys<'de, D, V>(
    deserializer: D,
) -> Result<Option<IndexMap<String, V>>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Unique<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Unique<V> {
        type Value = Option<IndexMap<String, V>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            collect_unique(map).map(Some)
        }
    }

    deserializer.deserialize_any(Unique(std::marker::PhantomData))
}

/// An input or output declaration in a spec: a kind, or a kind with docs.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSpecIo {
    /// Just the kind.
    Kind(String),
    /// Kind with details.
    Full {
        /// Artifact kind.
        kind: String,
        /// What it is.
        #[serde(default)]
        doc: Option<String>,
        /// Inputs only: whether it must be bound (default true).
        #[serde(default)]
        required: Option<bool>,
    },
}

impl RawSpecIo {
    /// The declared kind.
    pub fn kind(&self) -> &str {
        match self {
            RawSpecIo::Kind(k) => k,
            RawSpecIo::Full { kind, .. } => kind,
        }
    }
}

/// Type of a spec parameter.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// Text.
    String,
    /// Whole number.
    Integer,
    /// Any number.
    Number,
    /// true/false.
    Boolean,
    /// A sequence.
    List,
    /// A mapping.
    Map,
    /// Anything.
    Any,
}

/// A spec parameter declaration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpecParam {
    /// Expected type (default `any`).
    #[serde(default, rename = "type")]
    pub ty: Option<ParamType>,
    /// Default value; without one the parameter is required.
    #[serde(default)]
    pub default: Option<serde_yaml::Value>,
    /// What it does.
    #[serde(default)]
    pub doc: Option<String>,
}

/// A user step spec (`steps/NAME.yaml`): a reusable `command` with typed interface
/// (unknown top-level keys: see `RawPipeline`).
#[derive(Debug, Deserialize)]
pub struct RawSpec {
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// What the step does.
    #[serde(default)]
    pub description: Option<String>,
    /// Inputs it takes.
    #[serde(default)]
    pub inputs: Option<IndexMap<String, RawSpecIo>>,
    /// Outputs it creates.
    #[serde(default)]
    pub outputs: Option<IndexMap<String, RawSpecIo>>,
    /// Parameters, set with `with:` in the pipeline.
    #[serde(default)]
    pub params: Option<IndexMap<String, RawSpecParam>>,
    /// The program (string for `sh -c`, or argv list).
    pub run: serde_yaml::Value,
    /// Extra environment.
    #[serde(default)]
    pub env: Option<IndexMap<String, String>>,
    /// Seconds before the program is killed.
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Extra attempts after a failure.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Milliseconds before the first retry.
    #[serde(default)]
    pub retry_backoff_ms: Option<u64>,
}
