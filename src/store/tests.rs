//! Store properties: gc never deletes a referenced object; identical content is stored once.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;

/// A succeeded run of pipeline `p`.
fn insert_run(store: &Store, run: &str) {
    store
        .db()
        .insert_run(&RunRecord {
            id: run.into(),
            pipeline: "p".into(),
            pipeline_file: "p.yaml".into(),
            status: RunStatus::Succeeded,
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: None,
            pid: 1,
            args: json!({}),
        })
        .unwrap();
}

fn record_run(store: &Store, run: &str, outputs: &[ObjectDigest]) {
    insert_run(store, run);
    let outs: BTreeMap<String, OutputRef> = outputs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                format!("o{i}"),
                OutputRef {
                    digest: *d,
                    kind: "file".into(),
                },
            )
        })
        .collect();
    let record = StepRecord {
        run_id: run.into(),
        step: "s".into(),
        kind: "command".into(),
        version: "1".into(),
        status: StepStatus::Ran,
        reason: "test".into(),
        cache_key: Some(CacheKey::from(blake3::hash(run.as_bytes()))),
        duration_ms: 0,
        started_at: "2026-01-01T00:00:00Z".into(),
        params: json!({}),
        param_refs: BTreeMap::new(),
        inputs: BTreeMap::new(),
        outputs: outs.clone(),
        error: None,
        log: None,
    };
    let entry = CacheEntry {
        key: CacheKey::from(blake3::hash(run.as_bytes())),
        outputs: outs,
        run_id: run.into(),
        step: "s".into(),
    };
    store
        .db()
        .write_steps(
            &[StepWrite {
                record: &record,
                seq: 0,
                artifacts: &[],
                cache: Some(&entry),
                index_io: true,
                latest_in: None,
            }],
            &[],
        )
        .unwrap();
}

fn put(store: &Store, content: &[u8]) -> ObjectDigest {
    let dir = store.objects().temp_dir("t").unwrap();
    let f = dir.join("f");
    std::fs::write(&f, content).unwrap();
    let c = store.commit(&f).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    c.digest
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn gc_never_deletes_a_referenced_object(
        contents in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..12),
        runs in prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 0..4), 1..6),
        keep in 1usize..4,
    ) {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path(), Access::Shared).unwrap();
        let digests: Vec<ObjectDigest> = contents.iter().map(|c| put(&store, c)).collect();
        let mut referenced_by_run = Vec::new();
        for (i, picks) in runs.iter().enumerate() {
            let outs: Vec<ObjectDigest> = picks.iter().map(|ix| digests[ix.index(digests.len())]).collect();
            let id = format!("2026010{}-000000-{i:06x}", i);
            record_run(&store, &id, &outs);
            referenced_by_run.push((id, outs));
        }
        let report = store.gc(Some(keep), false).unwrap();
        let kept_runs: Vec<_> = referenced_by_run.iter().rev().take(keep).collect();
        for (_, outs) in &kept_runs {
            for d in outs {
                prop_assert!(store.objects().contains(d), "referenced object {d} was deleted");
                prop_assert_eq!(hash::hash_path(&store.object_path(d)).unwrap(), *d);
            }
        }
        for d in &report.removed {
            prop_assert!(!kept_runs.iter().any(|(_, outs)| outs.contains(d)));
        }
        prop_assert!(store.fsck(false).unwrap().problems.is_empty());
    }

    #[test]
    fn identical_content_is_stored_once(content in prop::collection::vec(any::<u8>(), 0..256), copies in 1usize..5) {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path(), Access::Shared).unwrap();
        let digests: Vec<ObjectDigest> = (0..copies).map(|_| put(&store, &content)).collect();
        prop_assert!(digests.windows(2).all(|w| w[0] == w[1]));
        prop_assert_eq!(store.objects().list().unwrap().len(), 1);
        prop_assert_eq!(std::fs::read(store.object_path(&digests[0])).unwrap(), content);
    }
}

#[test]
fn gc_without_records_removes_orphans_only() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let kept = put(&store, b"kept");
    let orphan = put(&store, b"orphan");
    record_run(&store, "20260101-000000-000001", &[kept]);
    let dry = store.gc(None, true).unwrap();
    assert_eq!(dry.removed, vec![orphan]);
    assert!(store.objects().contains(&orphan), "dry run removes nothing");
    store.gc(None, false).unwrap();
    assert!(!store.objects().contains(&orphan));
    assert!(store.objects().contains(&kept));
}

#[test]
fn fsck_finds_corruption() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let d = put(&store, b"content");
    record_run(&store, "20260101-000000-000001", &[d]);
    assert!(store.fsck(false).unwrap().problems.is_empty());
    let path = store.object_path(&d);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, b"tampered").unwrap();
    let report = store.fsck(false).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("corrupted"));
}

#[test]
fn a_version_1_store_learns_each_steps_last_execution() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    record_run(&store, "20260101-000000-000001", &[]);
    record_run(&store, "20260101-000000-000002", &[]);
    drop(store);
    // What version 1 had: an index on run_steps(step, run_id), no step_latest.
    let db = root.path().join("cairn.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "DROP TABLE step_latest; CREATE INDEX run_steps_by_step ON run_steps(step, run_id);
         DROP VIEW step_rows; DROP TABLE run_hits;
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);

    let store = Store::open(root.path(), Access::Shared).unwrap();
    let last = store.db().last_step_record("p", "s").unwrap().unwrap();
    assert_eq!(last.run_id, "20260101-000000-000002");
    assert!(store.db().last_step_record("p", "other").unwrap().is_none());
    drop(store);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (version, index): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version),
                    (SELECT COUNT(*) FROM sqlite_master WHERE name = 'run_steps_by_step')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, index), (4, 0));
}

/// Records `run` with one step `s` that produced `out`, as the step's latest execution
/// (full row) or, with `same_as`, as a cache hit pointing to that run's row.
fn record_step(store: &Store, run: &str, out: ObjectDigest, same_as: Option<&str>) -> StepRecord {
    insert_run(store, run);
    let record = StepRecord {
        run_id: run.into(),
        step: "s".into(),
        kind: "command".into(),
        version: "1".into(),
        status: if same_as.is_some() {
            StepStatus::Cached
        } else {
            StepStatus::Ran
        },
        reason: format!("reason of {run}"),
        cache_key: Some(CacheKey::from(blake3::hash(b"key"))),
        duration_ms: 0,
        started_at: "2026-01-01T00:00:00Z".into(),
        params: json!({"run": "echo hi > $out", "n": 3}),
        param_refs: [("mid".to_string(), json!(1))].into(),
        inputs: [(
            "prev".to_string(),
            InputRef {
                digest: out,
                from: "up.out".into(),
            },
        )]
        .into(),
        outputs: [(
            "out".to_string(),
            OutputRef {
                digest: out,
                kind: "file".into(),
            },
        )]
        .into(),
        error: None,
        log: None,
    };
    let write = StepWrite {
        record: &record,
        seq: 0,
        artifacts: &[],
        cache: None,
        index_io: false,
        latest_in: same_as.is_none().then(|| ("p", record.tag())),
    };
    let written = match same_as {
        Some(same_as) => store.db().write_steps(
            &[],
            &[HitWrite {
                run_id: &record.run_id,
                step: &record.step,
                seq: 0,
                reason: &record.reason,
                started_at: &record.started_at,
                same_as,
                cache: None,
            }],
        ),
        None => store.db().write_steps(&[write], &[]),
    };
    written.unwrap();
    record
}

/// The parameters stored in `run`'s own row of step `s`; `None` for a pointer.
fn stored_params(store: &Store, run: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(store.root().join("cairn.db")).unwrap();
    conn.query_row(
        "SELECT params FROM step_rows WHERE run_id = ?1",
        [run],
        |r| r.get(0),
    )
    .unwrap()
}

/// `run`'s row of step `s` holds its own parameters and reads back as `expected`.
fn assert_stored_whole(store: &Store, run: &str, expected: StepRecord) {
    assert!(stored_params(store, run).unwrap().contains("echo hi"));
    assert_eq!(store.db().run_steps(run).unwrap(), vec![expected]);
}

#[test]
fn a_cache_hit_like_the_last_execution_is_stored_as_a_pointer_and_reads_back_whole() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let out = put(&store, b"output");
    let first = record_step(&store, "20260101-000000-000001", out, None);
    let hit = record_step(
        &store,
        "20260101-000000-000002",
        out,
        Some("20260101-000000-000001"),
    );
    assert_eq!(stored_params(&store, "20260101-000000-000002"), None);
    let read = store.db().run_steps("20260101-000000-000002").unwrap();
    assert_eq!(read, vec![hit.clone()]);
    assert_eq!(read[0].params, first.params);
    assert_eq!(read[0].reason, "reason of 20260101-000000-000002");
    let latest = store.db().latest_executions("p").unwrap();
    assert_eq!(latest.len(), 1);
    assert_eq!(latest[0].run_id, "20260101-000000-000001");
    assert_eq!(latest[0].tag, Some(first.tag()));

    // Pruning the run it points to first copies what it shares into it.
    let report = store.gc(Some(1), false).unwrap();
    assert_eq!(report.dropped_runs, vec!["20260101-000000-000001"]);
    assert!(report.removed.is_empty(), "{report:?}");
    assert_stored_whole(&store, "20260101-000000-000002", hit);
}

#[test]
fn a_pointer_to_a_run_that_is_gone_is_refused_and_nothing_is_written() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    insert_run(&store, "20260101-000000-000002");
    let hit = HitWrite {
        run_id: "20260101-000000-000002",
        step: "s",
        seq: 0,
        reason: "unchanged",
        started_at: "2026-01-01T00:00:00Z",
        same_as: "no-such-run",
        cache: None,
    };
    let err = store.db().write_steps(&[], &[hit]).unwrap_err();
    assert!(
        err.to_string()
            .contains("step s points to run no-such-run, which is not in the store"),
        "{err}"
    );
    assert!(store
        .db()
        .run_steps("20260101-000000-000002")
        .unwrap()
        .is_empty());
}

#[test]
fn the_tag_changes_with_what_a_hit_could_differ_in() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let out = put(&store, b"output");
    let other = put(&store, b"other");
    let base = record_step(&store, "20260101-000000-000001", out, None);
    let mut renamed_upstream = base.clone();
    renamed_upstream.inputs.get_mut("prev").unwrap().from = "up2.out".into();
    let mut renamed_param = base.clone();
    renamed_param.param_refs = [("middle".to_string(), json!(1))].into();
    let mut remade_output = base.clone();
    remade_output.outputs.get_mut("out").unwrap().digest = other;
    let mut other_spec = base.clone();
    other_spec.kind = "./steps/other.yaml".into();
    let mut same = base.clone();
    same.run_id = "another".into();
    same.reason = "another reason".into();
    same.status = StepStatus::Cached;
    for changed in [
        &renamed_upstream,
        &renamed_param,
        &remade_output,
        &other_spec,
    ] {
        assert_ne!(changed.tag(), base.tag());
    }
    assert_eq!(same.tag(), base.tag());
}

#[test]
fn a_version_2_store_gains_pointer_rows() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let out = put(&store, b"output");
    record_step(&store, "20260101-000000-000001", out, None);
    drop(store);
    let db = root.path().join("cairn.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "DROP VIEW step_rows; DROP TABLE run_hits; ALTER TABLE step_latest DROP COLUMN tag;
         PRAGMA user_version = 2;",
    )
    .unwrap();
    drop(conn);

    let store = Store::open(root.path(), Access::Shared).unwrap();
    let latest = store.db().latest_executions("p").unwrap();
    assert_eq!(latest[0].tag, None, "version 2 rows have no tag");
    let hit = record_step(
        &store,
        "20260101-000000-000002",
        out,
        Some("20260101-000000-000001"),
    );
    assert_eq!(stored_params(&store, "20260101-000000-000002"), None);
    assert_eq!(
        store.db().run_steps("20260101-000000-000002").unwrap(),
        vec![hit]
    );
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
}

#[test]
fn a_version_3_stores_pointers_read_back_after_the_upgrade_and_new_ones_share_fields() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let out = put(&store, b"output");
    let first = record_step(&store, "20260101-000000-000001", out, None);
    insert_run(&store, "20260101-000000-000002");
    drop(store);
    // What version 3 had: run_hits without `shared`, each pointer whole.
    let db = root.path().join("cairn.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        r#"DROP VIEW step_rows; ALTER TABLE run_hits DROP COLUMN shared;
         CREATE VIEW step_rows AS
             SELECT run_id, step, seq, kind, version, status, reason, cache_key, duration_ms,
                 started_at, params, param_refs, inputs, outputs, error, log, NULL AS same_as
             FROM run_steps
             UNION ALL
             SELECT h.run_id, j.value ->> 'step', j.value ->> 'seq', NULL, NULL, 'cached',
                 j.value ->> 'reason', NULL, 0, j.value ->> 'started_at', NULL, NULL, NULL, NULL,
                 NULL, NULL, j.value ->> 'same_as'
             FROM run_hits h, json_each(h.steps) j;
         INSERT INTO run_hits (run_id, steps) VALUES ('20260101-000000-000002',
             '[{"step":"s","seq":0,"reason":"old reason","started_at":"2026-01-01T00:00:01Z","same_as":"20260101-000000-000001"}]');
         PRAGMA user_version = 3;"#,
    )
    .unwrap();
    drop(conn);

    let store = Store::open(root.path(), Access::Shared).unwrap();
    let old = store.db().run_steps("20260101-000000-000002").unwrap();
    let mut expected = first.clone();
    expected.run_id = "20260101-000000-000002".into();
    expected.status = StepStatus::Cached;
    expected.reason = "old reason".into();
    expected.started_at = "2026-01-01T00:00:01Z".into();
    expected.duration_ms = 0;
    assert_eq!(old, vec![expected]);

    // One row of three pointers: the second differs in reason, the third in time and run.
    insert_run(&store, "20260101-000000-000003");
    record_step(&store, "20260101-000000-000009", out, None);
    let hit = |seq, reason, started_at, same_as| HitWrite {
        run_id: "20260101-000000-000003",
        step: ["s", "t", "u"][seq],
        seq,
        reason,
        started_at,
        same_as,
        cache: None,
    };
    store
        .db()
        .write_steps(
            &[],
            &[
                hit(0, "same", "2026-01-01T00:00:02Z", "20260101-000000-000001"),
                hit(1, "other", "2026-01-01T00:00:02Z", "20260101-000000-000001"),
                hit(2, "same", "2026-01-01T00:00:03Z", "20260101-000000-000009"),
            ],
        )
        .unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let rows: Vec<(String, i64, String, String, String)> = conn
        .prepare("SELECT step, seq, reason, started_at, same_as FROM step_rows WHERE run_id = ?1 ORDER BY seq")
        .unwrap()
        .query_map(["20260101-000000-000003"], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let row = |step: &str, seq, reason: &str, at: &str, same_as: &str| {
        (
            step.to_string(),
            seq,
            reason.to_string(),
            at.to_string(),
            same_as.to_string(),
        )
    };
    assert_eq!(
        rows,
        vec![
            row(
                "s",
                0,
                "same",
                "2026-01-01T00:00:02Z",
                "20260101-000000-000001"
            ),
            row(
                "t",
                1,
                "other",
                "2026-01-01T00:00:02Z",
                "20260101-000000-000001"
            ),
            row(
                "u",
                2,
                "same",
                "2026-01-01T00:00:03Z",
                "20260101-000000-000009"
            ),
        ]
    );
    let steps: String = conn
        .query_row(
            "SELECT steps FROM run_hits WHERE run_id = '20260101-000000-000003'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        steps,
        r#"[{"step":"s","seq":0},{"step":"t","seq":1,"reason":"other"},{"step":"u","seq":2,"started_at":"2026-01-01T00:00:03Z","same_as":"20260101-000000-000009"}]"#
    );
}

/// Writes `content` over the read-only file at `path` (as a disk or a person might).
fn tamper(path: &std::path::Path, content: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, content).unwrap();
}

fn put_folder(store: &Store, files: &[(&str, &[u8])]) -> ObjectDigest {
    let dir = store.objects().temp_dir("t").unwrap();
    let folder = dir.join("folder");
    for (name, content) in files {
        std::fs::create_dir_all(folder.join(name).parent().unwrap()).unwrap();
        std::fs::write(folder.join(name), content).unwrap();
    }
    let c = store.commit(&folder).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    c.digest
}

fn assert_quarantined(store: &Store, digest: ObjectDigest, err: StoreError) {
    let message = err.to_string();
    assert!(
        message.contains(&format!("object {digest} is corrupted")) && message.contains("moved to"),
        "{message}"
    );
    let StoreError::CorruptObject {
        quarantined: Some(moved),
        ..
    } = err
    else {
        panic!("not a corrupt-object error: {message}");
    };
    assert!(moved.starts_with(store.root().join("quarantine")) && moved.exists());
    assert!(!store.objects().contains(&digest), "still in objects/");
}

#[test]
fn objects_are_verified_before_use_and_corrupted_ones_quarantined() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let intact = put(&store, b"intact bytes\n");
    store.verify_object(&intact).unwrap();

    let changed = put(&store, b"one byte will change\n");
    tamper(&store.object_path(&changed), b"one byte will chanGe\n");
    assert_quarantined(&store, changed, store.verify_object(&changed).unwrap_err());

    let truncated = put(&store, b"this file will lose its end\n");
    tamper(&store.object_path(&truncated), b"this file will");
    assert_quarantined(
        &store,
        truncated,
        store.verify_object(&truncated).unwrap_err(),
    );

    let folder = put_folder(&store, &[("a.txt", b"first"), ("sub/b.txt", b"second")]);
    store.verify_object(&folder).unwrap();
    tamper(&store.object_path(&folder).join("sub/b.txt"), b"secund");
    assert_quarantined(&store, folder, store.verify_object(&folder).unwrap_err());
}

#[test]
fn big_objects_are_verified_through_the_stat_cache() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let folder = put_folder(&store, &[("a.bin", b"weights"), ("b.bin", b"more weights")]);
    // A 0-byte limit sends every object through the stat cache: the first check hashes
    // it all, a later one only what changed since.
    store.verify_object_with(&folder, 0).unwrap();
    store.verify_object_with(&folder, 0).unwrap();
    tamper(&store.object_path(&folder).join("b.bin"), b"more weighs!");
    assert_quarantined(
        &store,
        folder,
        store.verify_object_with(&folder, 0).unwrap_err(),
    );
}

#[test]
fn fsck_repair_quarantines_corrupted_objects() {
    let root = tempfile::tempdir().unwrap();
    let store = Store::open(root.path(), Access::Shared).unwrap();
    let good = put(&store, b"good");
    let bad = put(&store, b"bad, soon");
    tamper(&store.object_path(&bad), b"bad, now");
    let report = store.fsck(true).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.repaired.len(), 1);
    assert!(store.objects().contains(&good));
    assert!(!store.objects().contains(&bad));
}
