//! Wall-clock timestamps and run ids, shared by the engine and the domain modules that
//! stamp what they fetch or store.

/// Current time as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A new time-sortable run id: `YYYYMMDD-HHMMSS-xxxxxx`.
pub fn new_run_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    format!(
        "{}-{:06x}",
        now.format(&fmt).unwrap_or_default(),
        rand::random::<u32>() & 0xff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_time_and_differ() {
        let a = new_run_id();
        let b = new_run_id();
        assert_eq!(a.len(), "20260101-000000-abcdef".len());
        assert!(a[..15] <= b[..15]);
        assert!(now_rfc3339().ends_with('Z'));
    }
}
