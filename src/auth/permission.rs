//! Shiro-style permissions, as Nightscout grants them.
//!
//! A permission is `:`-separated parts; a part may be a comma list of alternatives and
//! `*` matches any one part. A granted permission implies everything below it
//! (`api:treatments` implies `api:treatments:read`), and trailing `*` parts imply nothing
//! more than their absence. Each granted permission is judged on its own, which is the
//! documented rule; Nightscout's trie can deny a read when an unrelated `api:*:create`
//! shares its prefix, a quirk deliberately not reproduced.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    parts: Vec<Vec<String>>,
}

impl Permission {
    pub fn parse(text: &str) -> Permission {
        Permission {
            parts: text
                .split(':')
                .map(|part| part.split(',').map(str::to_string).collect())
                .collect(),
        }
    }

    /// Whether holding this permission grants `wanted` (a concrete permission such as
    /// `api:entries:read`, without wildcards or lists).
    pub fn implies(&self, wanted: &str) -> bool {
        let wanted: Vec<&str> = wanted.split(':').collect();
        self.parts.iter().enumerate().all(|(i, alternatives)| {
            let wildcard = alternatives.iter().any(|a| a == "*");
            match wanted.get(i) {
                Some(part) => wildcard || alternatives.iter().any(|a| a == part),
                None => wildcard,
            }
        })
    }
}

/// Whether any of `granted` implies `wanted`.
pub fn any_implies(granted: &[Permission], wanted: &str) -> bool {
    granted.iter().any(|p| p.implies(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(granted: &[&str], wanted: &str) -> bool {
        let granted: Vec<Permission> = granted.iter().map(|p| Permission::parse(p)).collect();
        any_implies(&granted, wanted)
    }

    #[test]
    fn permission_cases() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["*"], "api:treatments:read", true),
            (&["*"], "api:settings:admin", true),
            (&["*:*:read"], "api:entries:read", true),
            (&["*:*:read"], "api:settings:admin", false),
            (&["*:*:read"], "api:entries:create", false),
            (&["api:*:read"], "api:food:read", true),
            (&["api:*:read"], "api:settings:admin", false),
            (&["api:*:read"], "other:food:read", false),
            (&["api:treatments"], "api:treatments:read", true),
            (&["api:treatments"], "api:entries:read", false),
            (&["api"], "api:entries:read", true),
            (&["api:treatments,entries:read"], "api:entries:read", true),
            (&["api:treatments,entries:read"], "api:treatments:read", true),
            (&["api:treatments,entries:read"], "api:food:read", false),
            (&["api:treatments,entries:read"], "api:entries:create", false),
            (&["api:settings:read"], "api:settings:admin", false),
            (&["api:settings:admin"], "api:settings:admin", true),
            (&["api:settings:read,admin"], "api:settings:admin", true),
            (&["api:entries:read:*"], "api:entries:read", true),
            (&["api:entries:read:extra"], "api:entries:read", false),
            (&["api:treatments:create"], "api:treatments:read", false),
            (&[], "api:entries:read", false),
            (&[""], "api:entries:read", false),
            (&["API:entries:read"], "api:entries:read", false),
            (&["api:*:create", "api:entries:read"], "api:entries:read", true),
            (
                &["api:status:read", "api:devicestatus:create"],
                "api:devicestatus:read",
                false,
            ),
        ];
        for (granted, wanted, expected) in cases {
            assert_eq!(grants(granted, wanted), *expected, "{granted:?} → {wanted}");
        }
    }
}
