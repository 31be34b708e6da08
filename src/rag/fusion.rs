//! Reciprocal rank fusion (Cormack et al. 2009): each list votes 1 / (k + rank) for the
//! items it holds (rank from 1); a chunk found by several phrasings or collections rises.
//! Ties break by id, so the order is deterministic.

use std::collections::HashMap;

use super::Source;
use crate::vectorstore::Hit;

/// Fuses hit lists (each from one collection) into sources, best first.
pub fn reciprocal_rank(lists: &[(String, Vec<Hit>)], k: f64) -> Vec<Source> {
    let mut by_id: HashMap<&str, Source> = HashMap::new();
    for (collection, hits) in lists {
        for (rank, hit) in hits.iter().enumerate() {
            let vote = 1.0 / (k + rank as f64 + 1.0);
            let text = |key: &str| hit.payload[key].as_str().unwrap_or_default().to_string();
            let entry = by_id.entry(hit.id.as_str()).or_insert_with(|| Source {
                id: hit.id.clone(),
                collection: collection.clone(),
                chunk_id: text("chunk_id"),
                document_id: text("document_id"),
                url: text("url"),
                title: text("title"),
                text: text("text"),
                fused: 0.0,
                rerank: None,
                similarity: hit.score,
            });
            entry.fused += vote;
            entry.similarity = entry.similarity.max(hit.score);
        }
    }
    let mut out: Vec<Source> = by_id.into_values().collect();
    out.sort_by(|a, b| {
        b.fused
            .partial_cmp(&a.fused)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.id.cmp(&b.id))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(ids: &[&str]) -> Vec<Hit> {
        ids.iter()
            .map(|id| Hit {
                id: id.to_string(),
                score: 0.5,
                payload: serde_json::json!({"text": id}),
            })
            .collect()
    }

    #[test]
    fn items_in_several_lists_rise_and_ties_break_by_id() {
        let lists = vec![
            ("a".to_string(), hits(&["x", "y", "z"])),
            ("a".to_string(), hits(&["z", "w"])),
        ];
        let fused = reciprocal_rank(&lists, 60.0);
        let ids: Vec<&str> = fused.iter().map(|s| s.id.as_str()).collect();
        // z: 1/63 + 1/61 beats x: 1/61; w (1/62) and y (1/62) tie and sort by id.
        assert_eq!(ids, ["z", "x", "w", "y"]);
        assert!((fused[0].fused - (1.0 / 63.0 + 1.0 / 61.0)).abs() < 1e-12);
    }
}
