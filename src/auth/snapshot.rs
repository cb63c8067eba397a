//! One consistent view of subjects and roles: which subject a token names and what it
//! may read. Built from the raw documents of the auth collections; pure.

use std::collections::HashMap;
use std::sync::Arc;

use bson::{Bson, Document};

use super::permission::{Permission, any_implies};
use super::token::{Presented, TokenKeys, api_secret_hash};
use crate::collections::Collection;
use crate::json_form::id_string;

/// Roles Nightscout adds when no stored role has their name.
const BUILT_IN_ROLES: &[(&str, &[&str])] = &[
    ("admin", &["*"]),
    ("denied", &[]),
    ("status-only", &["api:status:read"]),
    ("readable", &["*:*:read"]),
    ("careportal", &["api:treatments:create"]),
    ("devicestatus-upload", &["api:devicestatus:create"]),
    ("activity", &["api:activity:create"]),
];

#[derive(Debug)]
pub struct Subject {
    /// `_id` as a string: stable across renames, the key subscriptions remember.
    pub id: String,
    pub name: String,
    keys: TokenKeys,
    permissions: Vec<Permission>,
}

impl Subject {
    pub fn may_read(&self, collection: Collection) -> bool {
        any_implies(&self.permissions, collection.read_permission())
    }
}

#[derive(Debug, Default)]
pub struct AuthSnapshot {
    /// In name order: the first subject a token matches wins, as in Nightscout.
    subjects: Vec<Arc<Subject>>,
    by_id: HashMap<String, Arc<Subject>>,
}

/// Something in the auth collections that was skipped.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthDataWarning(pub String);

impl AuthSnapshot {
    pub fn build(
        api_secret: &str,
        subject_docs: &[Document],
        role_docs: &[Document],
        default_roles: &[String],
    ) -> (AuthSnapshot, Vec<AuthDataWarning>) {
        let mut warnings = Vec::new();
        let roles = roles(role_docs, &mut warnings);
        let secret_hash = api_secret_hash(api_secret);
        let mut subjects: Vec<Arc<Subject>> = subject_docs
            .iter()
            .filter_map(|doc| subject(doc, &secret_hash, &roles, default_roles, &mut warnings))
            .map(Arc::new)
            .collect();
        // Byte order, as MongoDB sorts strings without a collation.
        subjects.sort_by(|a, b| a.name.cmp(&b.name));
        let by_id = subjects.iter().map(|s| (s.id.clone(), s.clone())).collect();
        (AuthSnapshot { subjects, by_id }, warnings)
    }

    /// The subject a presented access token names, if any.
    pub fn resolve(&self, token: &str) -> Option<Arc<Subject>> {
        let presented = Presented::parse(token)?;
        self.subjects.iter().find(|s| s.keys.matches(&presented)).cloned()
    }

    pub fn subject(&self, id: &str) -> Option<&Arc<Subject>> {
        self.by_id.get(id)
    }

    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
}

fn roles(docs: &[Document], warnings: &mut Vec<AuthDataWarning>) -> HashMap<String, Vec<Permission>> {
    let mut roles: HashMap<String, Vec<Permission>> = HashMap::new();
    for doc in docs {
        let id = doc
            .get("_id")
            .map_or_else(|| "without _id".to_string(), id_string);
        let Ok(name) = doc.get_str("name") else {
            warnings.push(AuthDataWarning(format!("role ({id}) has no name; skipped")));
            continue;
        };
        if roles.contains_key(name) {
            warnings.push(AuthDataWarning(format!(
                "role {name:?} ({id}): a role of that name came first; skipped"
            )));
            continue;
        }
        let permissions = match doc.get("permissions") {
            Some(Bson::Array(items)) => items
                .iter()
                .filter_map(|item| match item {
                    Bson::String(p) => Some(Permission::parse(p)),
                    other => {
                        warnings.push(AuthDataWarning(format!(
                            "role {name:?}: permission {other} is not a string; skipped"
                        )));
                        None
                    }
                })
                .collect(),
            None | Some(Bson::Null) => Vec::new(),
            Some(_) => {
                warnings.push(AuthDataWarning(format!(
                    "role {name:?}: permissions is not an array; role skipped"
                )));
                continue;
            }
        };
        roles.insert(name.to_string(), permissions);
    }
    for (name, permissions) in BUILT_IN_ROLES {
        roles
            .entry(name.to_string())
            .or_insert_with(|| permissions.iter().map(|p| Permission::parse(p)).collect());
    }
    roles
}

fn subject(
    doc: &Document,
    secret_hash: &str,
    roles: &HashMap<String, Vec<Permission>>,
    default_roles: &[String],
    warnings: &mut Vec<AuthDataWarning>,
) -> Option<Subject> {
    let id = match doc.get("_id") {
        Some(Bson::ObjectId(oid)) => oid.to_hex(),
        Some(Bson::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            warnings.push(AuthDataWarning("subject without a usable _id; skipped".into()));
            return None;
        }
    };
    let name = match doc.get("name") {
        Some(Bson::String(name)) if !name.is_empty() => name.clone(),
        _ => {
            warnings.push(AuthDataWarning(format!("subject {id}: no name; skipped")));
            return None;
        }
    };
    let role_names: Vec<&str> = match doc.get("roles") {
        Some(Bson::Array(items)) => items
            .iter()
            .filter_map(|item| match item {
                Bson::String(r) => Some(r.as_str()),
                other => {
                    warnings.push(AuthDataWarning(format!(
                        "subject {name:?}: role {other} is not a string; ignored"
                    )));
                    None
                }
            })
            .collect(),
        None | Some(Bson::Null) => Vec::new(),
        Some(_) => {
            warnings.push(AuthDataWarning(format!(
                "subject {name:?}: roles is not an array; skipped"
            )));
            return None;
        }
    };
    // Unknown role names grant nothing, as in Nightscout.
    let permissions = role_names
        .into_iter()
        .chain(default_roles.iter().map(String::as_str))
        .filter_map(|r| roles.get(r))
        .flatten()
        .cloned()
        .collect();
    Some(Subject {
        keys: TokenKeys::new(secret_hash, &id, &name),
        id,
        name,
        permissions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::{access_token, sha1_hex, subject_digest};
    use bson::{doc, oid::ObjectId};

    const SECRET: &str = "this is my long pass phrase";

    fn token_for(id: &str, name: &str) -> String {
        access_token(name, &subject_digest(&api_secret_hash(SECRET), id))
    }

    fn subject_doc(id: &str, name: &str, roles: &[&str]) -> Document {
        doc! { "_id": ObjectId::parse_str(id).unwrap(), "name": name, "roles": roles }
    }

    fn readable(snapshot: &AuthSnapshot, token: &str) -> Vec<&'static str> {
        let subject = snapshot.resolve(token).expect("token resolves");
        Collection::ALL
            .into_iter()
            .filter(|c| subject.may_read(*c))
            .map(Collection::name)
            .collect()
    }

    const ID_A: &str = "5f1e4b2a9c8d7e6f5a4b3c2d";
    const ID_B: &str = "65a1b2c3d4e5f60718293a4b";

    #[test]
    fn test_vector_subject_resolves() {
        let subjects = [subject_doc(ID_A, "Test Subject_AAPS!", &["admin"])];
        let (snapshot, warnings) = AuthSnapshot::build(SECRET, &subjects, &[], &[]);
        assert!(warnings.is_empty());
        let s = snapshot.resolve("testsubjec-cee53db93200a08f").unwrap();
        assert_eq!((s.id.as_str(), s.name.as_str()), (ID_A, "Test Subject_AAPS!"));
        assert!(snapshot.resolve("testsubjec-cee53db93200a08").is_none());
        assert!(
            snapshot
                .resolve(&sha1_hex("testsubjec-cee53db93200a08f"))
                .is_some()
        );
        assert!(snapshot.resolve("").is_none());
    }

    #[test]
    fn first_match_in_name_order_wins() {
        // One _id under two names (say, a restored copy): both digests match the token.
        let subjects = [
            subject_doc(ID_A, "zeta", &["admin"]),
            subject_doc(ID_A, "alpha", &["denied"]),
        ];
        let (snapshot, _) = AuthSnapshot::build(SECRET, &subjects, &[], &[]);
        let token = token_for(ID_A, "zeta");
        assert_eq!(snapshot.resolve(&token).unwrap().name, "alpha");
        assert_eq!(snapshot.len(), 2);
    }

    #[test]
    fn default_roles_and_built_in_roles() {
        let subjects = [
            subject_doc(ID_A, "follower", &[]),
            subject_doc(ID_B, "admin", &["admin"]),
        ];
        let readable_role = vec!["readable".to_string()];
        let (snapshot, _) = AuthSnapshot::build(SECRET, &subjects, &[], &readable_role);
        let all_but_settings = ["devicestatus", "entries", "food", "profile", "treatments"];
        assert_eq!(
            readable(&snapshot, &token_for(ID_A, "follower")),
            all_but_settings
        );
        assert_eq!(
            readable(&snapshot, &token_for(ID_B, "admin")),
            [
                "devicestatus",
                "entries",
                "food",
                "profile",
                "settings",
                "treatments"
            ]
        );
        let (none, _) = AuthSnapshot::build(SECRET, &subjects, &[], &[]);
        assert!(readable(&none, &token_for(ID_A, "follower")).is_empty());
    }

    #[test]
    fn stored_roles_override_built_ins_and_combine() {
        let roles = [
            doc! { "name": "readable", "permissions": ["api:entries:read"] },
            doc! { "name": "tx", "permissions": ["api:treatments,food:read"] },
            doc! { "name": "status-only", "permissions": ["api:status:read"] },
        ];
        let subjects = [subject_doc(ID_A, "s", &["readable", "tx", "no-such-role"])];
        let (snapshot, warnings) = AuthSnapshot::build(SECRET, &subjects, &roles, &[]);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            readable(&snapshot, &token_for(ID_A, "s")),
            ["entries", "food", "treatments"]
        );
    }

    #[test]
    fn careportal_and_upload_roles_read_nothing() {
        let subjects = [subject_doc(
            ID_A,
            "uploader",
            &["careportal", "devicestatus-upload", "activity", "status-only"],
        )];
        let (snapshot, _) = AuthSnapshot::build(SECRET, &subjects, &[], &[]);
        assert!(readable(&snapshot, &token_for(ID_A, "uploader")).is_empty());
    }

    #[test]
    fn malformed_documents_are_skipped_with_one_warning_each() {
        let roles = [
            doc! { "permissions": ["*"] },
            doc! { "name": "bad-perms", "permissions": "api:*:read" },
            doc! { "name": "mixed", "permissions": ["api:entries:read", 7, Bson::Null] },
            doc! { "name": "mixed", "permissions": ["*"] },
        ];
        let subjects = [
            doc! { "_id": ObjectId::new(), "roles": ["admin"] },
            doc! { "_id": ObjectId::new(), "name": 42, "roles": ["admin"] },
            doc! { "_id": ObjectId::new(), "name": "roles-string", "roles": "admin" },
            doc! { "name": "no-id", "roles": ["admin"] },
            doc! { "_id": ObjectId::parse_str(ID_A).unwrap(), "name": "good", "roles": ["mixed", 5, "bad-perms"] },
        ];
        let (snapshot, warnings) = AuthSnapshot::build(SECRET, &subjects, &roles, &[]);
        assert_eq!(warnings.len(), 10, "{warnings:#?}");
        assert_eq!(snapshot.len(), 1);
        // The duplicate "mixed" granting "*" was skipped; the first one's valid permission stays.
        assert_eq!(readable(&snapshot, &token_for(ID_A, "good")), ["entries"]);
    }

    #[test]
    fn lookup_by_id() {
        let subjects = [subject_doc(ID_A, "a", &["admin"])];
        let (snapshot, _) = AuthSnapshot::build(SECRET, &subjects, &[], &[]);
        assert_eq!(snapshot.subject(ID_A).unwrap().name, "a");
        assert!(snapshot.subject(ID_B).is_none());
    }
}
