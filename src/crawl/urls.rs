//! URL normalization and crawl scope.

use url::Url;

/// The dedupe key of a URL: no fragment, default port dropped, query pairs sorted, no
/// trailing slash (except the root), lowercase scheme and host.
pub fn normalize(url: &Url) -> String {
    let mut u = url.clone();
    u.set_fragment(None);
    let mut pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        u.set_query(None);
    } else {
        pairs.sort();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let path = u.path().to_string();
    if path.len() > 1 && path.ends_with('/') {
        u.set_path(path.trim_end_matches('/'));
    }
    u.to_string()
}

/// How far a crawl may wander from its start links.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Follow {
    /// Only the start links.
    None,
    /// Links on the same host (a leading `www.` is ignored).
    SameDomain,
    /// Links under the start link's folder (`https://x.org/blog/` for `https://x.org/blog/a`).
    SamePrefix,
}

fn bare_host(u: &Url) -> String {
    u.host_str()
        .unwrap_or("")
        .trim_start_matches("www.")
        .to_ascii_lowercase()
}

/// The folder prefix of a start link.
pub fn prefix_of(u: &Url) -> String {
    let s = normalize(u);
    let without_query = s.split(['?', '#']).next().unwrap_or(&s).to_string();
    if u.path().ends_with('/') {
        format!("{}/", without_query.trim_end_matches('/'))
    } else {
        match without_query.rfind('/') {
            Some(i) => without_query[..=i].to_string(),
            None => without_query,
        }
    }
}

/// Whether `candidate` is in scope of any start link under `follow`.
pub fn in_scope(candidate: &Url, starts: &[Url], follow: Follow) -> bool {
    match follow {
        Follow::None => false,
        Follow::SameDomain => starts.iter().any(|s| bare_host(s) == bare_host(candidate)),
        Follow::SamePrefix => {
            let c = normalize(candidate);
            starts.iter().any(|s| {
                let p = prefix_of(s);
                c.starts_with(&p) || format!("{c}/") == p
            })
        }
    }
}

/// Whether a link names a git repository rather than a page.
pub fn is_git_repository(raw: &str) -> bool {
    if raw.starts_with("git@")
        || raw.starts_with("git://")
        || raw.trim_end_matches('/').ends_with(".git")
    {
        return true;
    }
    match Url::parse(raw) {
        Ok(u) => {
            let host = bare_host(&u);
            let segments: Vec<&str> = u
                .path_segments()
                .map(|s| s.filter(|x| !x.is_empty()).collect())
                .unwrap_or_default();
            matches!(
                host.as_str(),
                "github.com" | "gitlab.com" | "bitbucket.org" | "codeberg.org"
            ) && segments.len() == 2
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn normalization_dedupes_equivalent_urls() {
        let a = normalize(&u("HTTP://Example.ORG:80/blog/?b=2&a=1#top"));
        let b = normalize(&u("http://example.org/blog?a=1&b=2"));
        assert_eq!(a, b);
        assert_eq!(normalize(&u("https://x.org/")), "https://x.org/");
        assert_ne!(
            normalize(&u("https://x.org/a?x=1")),
            normalize(&u("https://x.org/a?x=2"))
        );
    }

    #[test]
    fn scope_rules() {
        let starts = [u("https://www.blog.org/posts/first")];
        assert!(in_scope(
            &u("https://blog.org/about"),
            &starts,
            Follow::SameDomain
        ));
        assert!(!in_scope(
            &u("https://other.org/"),
            &starts,
            Follow::SameDomain
        ));
        assert!(in_scope(
            &u("https://www.blog.org/posts/second"),
            &starts,
            Follow::SamePrefix
        ));
        assert!(!in_scope(
            &u("https://www.blog.org/about"),
            &starts,
            Follow::SamePrefix
        ));
        assert!(!in_scope(
            &u("https://www.blog.org/posts/x"),
            &starts,
            Follow::None
        ));
    }

    #[test]
    fn git_links() {
        assert!(is_git_repository("https://github.com/user/project"));
        assert!(is_git_repository("file:///tmp/repo.git"));
        assert!(is_git_repository("git@github.com:user/project.git"));
        assert!(!is_git_repository(
            "https://github.com/user/project/issues/3"
        ));
        assert!(!is_git_repository("https://blog.org/post"));
    }
}
