//! What `cairn gc` keeps: every object a remaining run step, its cache entries or its
//! logs still reference; dead cache entries and artifact rows go with it.

use std::collections::{BTreeMap, HashSet};

use rusqlite::params;

use super::{parse_json, Database};
use crate::store::{InputRef, ObjectDigest, OutputRef, StoreError};

impl Database {
    /// Cache entries that a remaining run step still refers to; the others are dropped
    /// unless `dry_run`. Returns every object digest that stays referenced.
    pub fn referenced_objects(
        &mut self,
        dropped_runs: &[String],
        dry_run: bool,
    ) -> Result<HashSet<ObjectDigest>, StoreError> {
        let dropped: HashSet<&str> = dropped_runs.iter().map(|s| s.as_str()).collect();
        let mut live_keys = HashSet::new();
        let mut referenced = HashSet::new();
        {
            let mut stmt = self.conn.prepare(
                "SELECT s.run_id, COALESCE(s.cache_key, f.cache_key), COALESCE(s.inputs, f.inputs),
                     COALESCE(s.outputs, f.outputs), s.log FROM step_rows s
                     LEFT JOIN run_steps f ON s.same_as IS NOT NULL
                         AND f.run_id = s.same_as AND f.step = s.step",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?;
            for row in rows {
                let (run_id, key, inputs, outputs, log) = row?;
                if dropped.contains(run_id.as_str()) {
                    continue;
                }
                if let Some(key) = key {
                    live_keys.insert(key);
                }
                let inputs: BTreeMap<String, InputRef> = parse_json(&inputs)?;
                let outputs: BTreeMap<String, OutputRef> = parse_json(&outputs)?;
                referenced.extend(inputs.values().map(|i| i.digest));
                referenced.extend(outputs.values().map(|o| o.digest));
                if let Some(log) = log.and_then(|l| l.parse().ok()) {
                    referenced.insert(log);
                }
            }
        }
        let mut dead_keys = Vec::new();
        {
            let mut stmt = self.conn.prepare("SELECT key, outputs FROM cache")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (key, outputs) = row?;
                if live_keys.contains(&key) {
                    let outputs: BTreeMap<String, OutputRef> = parse_json(&outputs)?;
                    referenced.extend(outputs.values().map(|o| o.digest));
                } else {
                    dead_keys.push(key);
                }
            }
        }
        if !dry_run {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for key in &dead_keys {
                tx.execute("DELETE FROM cache WHERE key = ?1", params![key])?;
            }
            let mut stmt = tx.prepare("SELECT digest FROM artifacts")?;
            let all: Vec<String> = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            drop(stmt);
            for d in all {
                let keep = d
                    .parse::<ObjectDigest>()
                    .is_ok_and(|d| referenced.contains(&d));
                if !keep {
                    tx.execute("DELETE FROM artifacts WHERE digest = ?1", params![d])?;
                }
            }
            tx.commit()?;
        }
        Ok(referenced)
    }

    /// Every digest the database mentions as an artifact, cache output or log.
    pub fn all_recorded_objects(&self) -> Result<HashSet<ObjectDigest>, StoreError> {
        let mut out = HashSet::new();
        let mut stmt = self.conn.prepare("SELECT digest FROM artifacts")?;
        for d in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(d) = d?.parse() {
                out.insert(d);
            }
        }
        let mut stmt = self.conn.prepare("SELECT outputs FROM cache")?;
        for o in stmt.query_map([], |r| r.get::<_, String>(0))? {
            let outputs: BTreeMap<String, OutputRef> = parse_json(&o?)?;
            out.extend(outputs.values().map(|o| o.digest));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT log FROM run_steps WHERE log IS NOT NULL")?;
        for l in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Ok(d) = l?.parse() {
                out.insert(d);
            }
        }
        Ok(out)
    }
}
