//! Experiments over recorded runs: comparing runs and sweep variants side by side, and
//! exporting runs as OpenLineage events. Reads the store only.

pub mod compare;
pub mod openlineage;
