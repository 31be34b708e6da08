//! The naming convention of foreach/matrix variants, shared by the loader (which makes
//! the names), the command step (collections of inputs) and run comparison: a variant is
//! `NAME[ITEM]` (`train[rank=8,lr=1e-4]`), and a collection input bound to every variant
//! of a step is `INPUT[ITEM]`.

/// `("train", "rank=8")` -> `train[rank=8]`.
pub fn join(base: &str, item: &str) -> String {
    format!("{base}[{item}]")
}

/// `train[rank=8]` -> `("train", "rank=8")`; `None` for a plain name.
pub fn split(name: &str) -> Option<(&str, &str)> {
    name.strip_suffix(']')?.split_once('[')
}

/// The name without its item: `train[rank=8]` -> `train`, `train` -> `train`.
pub fn base(name: &str) -> &str {
    split(name).map_or(name, |(base, _)| base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_base_and_item() {
        assert_eq!(
            split("train[rank=8,lr=0.5]"),
            Some(("train", "rank=8,lr=0.5"))
        );
        assert_eq!(split("train"), None);
        assert_eq!(split(&join("a", "x=1")), Some(("a", "x=1")));
        assert_eq!(base("models[rank=8]"), "models");
        assert_eq!(base("plain"), "plain");
    }
}
