//! The `VectorStore` contract, checked on the embedded Qdrant Edge store always and on a
//! Qdrant server when `CAIRN_TEST_QDRANT_URL` is set (e.g. http://127.0.0.1:6334 after
//! `docker compose up qdrant`; needs `--features qdrant`).

use cairn::vectorstore::{self, point_id, Point, Receipt, VectorError, VectorStore};
use serde_json::{json, Map};

fn points(n: usize, dim: usize, tag: &str) -> Vec<Point> {
    (0..n)
        .map(|i| {
            // Pseudo-random components in [-1, 1), reproducible from the point's name.
            let seed = blake3::hash(format!("{tag}-{i}").as_bytes());
            let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
            let mut bytes = vec![0u8; dim * 2];
            xof.fill(&mut bytes);
            let vector: Vec<f32> = bytes
                .chunks(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0 - 1.0)
                .collect();
            let mut payload = Map::new();
            payload.insert("text".into(), json!(format!("{tag} point {i}")));
            payload.insert(
                "category".into(),
                json!(if i % 2 == 0 { "article" } else { "post" }),
            );
            payload.insert("author".into(), json!("me"));
            Point {
                id: point_id(&format!("{tag}-{i}")),
                vector,
                payload,
            }
        })
        .collect()
}

async fn contract(store: &dyn VectorStore, collection: &str) {
    let dim = 16;
    store.ensure_collection(collection, dim).await.unwrap();
    store.ensure_collection(collection, dim).await.unwrap();
    match store.ensure_collection(collection, dim + 1).await {
        Err(VectorError::DimensionMismatch {
            existing, wanted, ..
        }) => assert_eq!((existing, wanted), (dim, dim + 1)),
        other => panic!("expected a dimension mismatch, got {other:?}"),
    }
    let batch = points(200, dim, collection);
    store.upsert(collection, batch.clone()).await.unwrap();
    // Reloading the same chunks is idempotent: ids derive from chunk ids.
    store.upsert(collection, batch.clone()).await.unwrap();
    store.finish(collection).await.unwrap();
    assert_eq!(store.count(collection).await.unwrap(), Some(200));
    assert_eq!(store.count("never_created_here").await.unwrap(), None);
    let ids: Vec<uuid::Uuid> = batch.iter().take(10).map(|p| p.id).collect();
    assert_eq!(store.count_existing(collection, &ids).await.unwrap(), 10);
    assert_eq!(
        store
            .count_existing(collection, &[point_id("absent")])
            .await
            .unwrap(),
        0
    );

    let hits = store
        .search(collection, batch[3].vector.clone(), 5, &[])
        .await
        .unwrap();
    assert_eq!(hits.len(), 5);
    assert_eq!(hits[0].id, batch[3].id.to_string());
    assert!(
        (hits[0].score - 1.0).abs() < 1e-4,
        "cosine of a vector with itself: {}",
        hits[0].score
    );
    assert_eq!(hits[0].payload["text"], format!("{collection} point 3"));
    let filtered = store
        .search(
            collection,
            batch[3].vector.clone(),
            5,
            &[("category".into(), "article".into())],
        )
        .await
        .unwrap();
    assert!(filtered.iter().all(|h| h.payload["category"] == "article"));
    assert_ne!(filtered[0].id, batch[3].id.to_string(), "point 3 is a post");

    // A re-chunk leaves 150 of the 200 chunks: the other 50 points go.
    let keep: std::collections::HashSet<uuid::Uuid> =
        batch.iter().take(150).map(|p| p.id).collect();
    assert_eq!(store.retain(collection, &keep).await.unwrap(), 50);
    assert_eq!(store.count(collection).await.unwrap(), Some(150));
    assert_eq!(
        store
            .count_existing(collection, &[batch[199].id])
            .await
            .unwrap(),
        0
    );

    let mut receipt = Receipt {
        store: store.describe(),
        model: "m".into(),
        model_dir: String::new(),
        dim,
        collections: Default::default(),
    };
    receipt.collections.insert(
        collection.to_string(),
        vectorstore::CollectionReceipt {
            points: 150,
            sample_ids: ids.clone(),
        },
    );
    vectorstore::verify(store, &receipt).await.unwrap();
    receipt
        .collections
        .get_mut(collection)
        .unwrap()
        .sample_ids
        .push(point_id("absent"));
    let err = vectorstore::verify(store, &receipt).await.unwrap_err();
    assert!(err.contains("lacks 1 of 11 sampled points"), "{err}");
}

#[cfg(feature = "qdrant-edge")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_edge_store_meets_the_contract_and_persists() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = vectorstore::open(None, tmp.path()).await.unwrap();
        assert!(store.describe().starts_with("qdrant-edge:"));
        contract(store.as_ref(), "edge_contract").await;
    }
    // Reopened from disk in a new store value.
    let store = vectorstore::open(None, tmp.path()).await.unwrap();
    assert_eq!(store.count("edge_contract").await.unwrap(), Some(150));
    let err = store.ensure_collection("bad name/..", 4).await.unwrap_err();
    assert!(err.to_string().contains("invalid collection name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_server_meets_the_contract() {
    let Ok(url) = std::env::var("CAIRN_TEST_QDRANT_URL") else {
        eprintln!("skipped: set CAIRN_TEST_QDRANT_URL (e.g. http://127.0.0.1:6334) to test against a Qdrant server");
        return;
    };
    if !cfg!(feature = "qdrant") {
        eprintln!("skipped: CAIRN_TEST_QDRANT_URL is set but this build lacks `--features qdrant`");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = vectorstore::open(Some(&url), tmp.path()).await.unwrap();
    let collection = format!("cairn_test_{}", std::process::id());
    contract(store.as_ref(), &collection).await;
}
