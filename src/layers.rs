//! The layering rule, checked: arrows between cairn's modules point one way only.
//! A module may use its own layer's modules (without cycles) and lower layers, never a
//! higher one. Adding a module means placing it in [`LAYERS`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules by layer, lowest first.
const LAYERS: &[&[&str]] = &[
    // Leaf utilities and self-contained formats: import no other cairn module but these.
    &[
        "util",
        "graph",
        "redact",
        "documents",
        "extract",
        "helper",
        "models",
        "llm",
    ],
    // Objects and records, here and on a remote.
    &["store", "remote"],
    // Domain code: knows nothing of steps, pipelines or the engine.
    &[
        "crawl",
        "ingest",
        "clean",
        "chunk",
        "dataset",
        "docstore",
        "vectorstore",
        "embed",
        "ml",
        "experiments",
        "inference",
        "rag",
    ],
    // Adapters from domain code to the `Step` contract.
    &["steps"],
    // YAML -> resolved pipeline.
    &["pipeline"],
    // Plan and execute.
    &["engine"],
    // Thin front ends.
    &["cli", "ui", "serve"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// `crate::NAME` references in Rust source, comments skipped; `use crate::{a, b::c}`
/// groups count each name.
fn referenced_modules(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                for item in group.split([',', '}']) {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != "self" {
                        out.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

/// Module -> modules it references, for every top-level module of the library.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(src) {
        let entry = entry.expect("readable src/");
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(src).expect("under src/");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default();
        let module = first.trim_end_matches(".rs").to_string();
        // The helper binary is its own crate; lib.rs and main.rs are roots, not layers.
        if matches!(module.as_str(), "bin" | "lib" | "main" | "layers") {
            continue;
        }
        let source = std::fs::read_to_string(path).expect("readable source");
        let refs = referenced_modules(&source);
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(refs.into_iter().filter(|r| *r != module));
    }
    graph
}

#[test]
fn the_reference_scanner_reads_paths_and_groups() {
    let refs = referenced_modules(
        "use crate::store::{Store, StoreError};\nuse crate::{dataset, ml::job, self};\n// crate::engine in a comment\nlet t = crate::util::clock::now_rfc3339();",
    );
    let want: BTreeSet<String> = ["store", "dataset", "ml", "util"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(refs, want);
}

#[test]
fn lower_layers_never_import_higher_ones_and_modules_form_no_cycle() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut problems = Vec::new();
    for (module, deps) in &graph {
        let Some(own) = layer_of(module) else {
            problems.push(format!(
                "module `{module}` has no layer: add it to LAYERS in src/layers.rs"
            ));
            continue;
        };
        for dep in deps {
            match layer_of(dep) {
                Some(theirs) if theirs > own => problems.push(format!(
                    "`{module}` (layer {own}) imports `{dep}` (layer {theirs}), a higher layer"
                )),
                _ => {}
            }
        }
    }
    let names: Vec<&String> = graph.keys().collect();
    let index: BTreeMap<&String, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let edges = graph.iter().flat_map(|(module, deps)| {
        let from = index[module];
        deps.iter()
            .filter_map(|d| index.get(d).map(|&to| (to, from)))
            .collect::<Vec<_>>()
    });
    if let Err(cycle) = crate::graph::Dag::build(names.len(), edges) {
        let cycle: Vec<&str> = cycle.iter().map(|&i| names[i].as_str()).collect();
        problems.push(format!("import cycle: {}", cycle.join(" <- ")));
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}
