//! Which homeserver URLs mxhsm talks to.
//!
//! The password and the access token travel in every request, so plain `http://` is
//! accepted only for loopback addresses (a homeserver on this machine, or a test server),
//! unless the caller explicitly allows it. A URL with user info, a query or a fragment is
//! refused: none of them belong in a homeserver's base URL, and user info is a classic way
//! of making `https://matrix.example.org@evil.example` look like something else.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::HomeserverError;

/// A homeserver base URL that passed the transport policy: `scheme://host[:port][/path]`,
/// without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeserverUrl {
    base: String,
    host: String,
    https: bool,
}

impl HomeserverUrl {
    /// Parses and checks `input`. `allow_plain_http` permits `http://` to hosts other than
    /// loopback (the caller warns the user).
    pub fn parse(input: &str, allow_plain_http: bool) -> Result<HomeserverUrl, HomeserverError> {
        let bad = |reason: &str| HomeserverError::BadUrl {
            url: input.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = input.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (https, rest) = if lower.starts_with("https://") {
            (true, trimmed[8..].trim_end_matches('/'))
        } else if lower.starts_with("http://") {
            (false, trimmed[7..].trim_end_matches('/'))
        } else {
            return Err(bad(
                "it is not a homeserver URL (https://…): the scheme must be https",
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(bad("a homeserver URL has no query or fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad(
                "a homeserver URL has no user name or password before the host",
            ));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("its path contains spaces or control characters"));
        }
        let (host, port) =
            split_host_port(authority).ok_or_else(|| bad("its host is not valid"))?;
        if let Some(p) = port
            && !p.parse::<u16>().is_ok_and(|n| n > 0)
        {
            return Err(bad("its port is not a number from 1 to 65535"));
        }
        let host = host.to_ascii_lowercase();
        let url = HomeserverUrl {
            base: format!(
                "{}://{authority_lower}{path}",
                if https { "https" } else { "http" },
                authority_lower = authority.to_ascii_lowercase()
            ),
            host,
            https,
        };
        if !https && !url.is_loopback() && !allow_plain_http {
            return Err(HomeserverError::PlainHttp {
                url: url.base.clone(),
            });
        }
        Ok(url)
    }

    pub fn as_str(&self) -> &str {
        &self.base
    }

    /// Whether the host is this machine (`localhost`, 127.0.0.0/8, `::1`).
    pub fn is_loopback(&self) -> bool {
        let h = self.host.trim_start_matches('[').trim_end_matches(']');
        h == "localhost"
            || h.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
            || h.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback())
    }

    /// Whether requests go out unencrypted to another machine (allowed only on request).
    pub fn is_insecure(&self) -> bool {
        !self.https && !self.is_loopback()
    }
}

impl std::fmt::Display for HomeserverUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// `host[:port]` or `[v6][:port]`, with a host of DNS-name characters or an address.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &authority[..end + 2];
        rest[..end].parse::<Ipv6Addr>().ok()?;
        match &rest[end + 1..] {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let name_ok = host.starts_with('[')
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    name_ok.then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> HomeserverUrl {
        HomeserverUrl::parse(s, false).unwrap()
    }

    #[test]
    fn https_anywhere_http_only_on_loopback() {
        assert_eq!(
            ok("https://Matrix.Example.org/").as_str(),
            "https://matrix.example.org"
        );
        assert_eq!(
            ok("https://example.org:8448/base").as_str(),
            "https://example.org:8448/base"
        );
        for local in [
            "http://127.0.0.1:8008",
            "http://localhost",
            "http://[::1]:8008",
            "http://127.5.6.7",
        ] {
            assert!(ok(local).is_loopback(), "{local}");
            assert!(!ok(local).is_insecure());
        }
        for remote in [
            "http://matrix.example.org",
            "http://10.0.0.1:8008",
            "http://[2001:db8::1]",
            "http://localhost.example.org",
        ] {
            assert!(
                matches!(
                    HomeserverUrl::parse(remote, false),
                    Err(HomeserverError::PlainHttp { .. })
                ),
                "{remote}"
            );
            let allowed = HomeserverUrl::parse(remote, true).unwrap();
            assert!(allowed.is_insecure(), "{remote}");
        }
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        for (bad, why) in [
            ("matrix.example.org", "scheme"),
            ("ftp://example.org", "scheme"),
            ("https://user:pw@example.org", "user name"),
            ("https://example.org@evil.example", "user name"),
            ("https://example.org/?x=1", "query"),
            ("https://example.org:99999", "port"),
            ("https://exa mple.org", "host"),
            ("https://", "host"),
            ("https://[::1", "host"),
            ("https://example.org/a b", "spaces"),
        ] {
            match HomeserverUrl::parse(bad, true) {
                Err(HomeserverError::BadUrl { reason, .. }) => {
                    assert!(reason.contains(why), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
