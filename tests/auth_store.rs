//! The subject and role store against a real MongoDB wire-protocol server: it follows
//! writes to `auth_subjects` and `auth_roles` while running, told of them by the change
//! stream of its database.

mod support;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::Database;
use mongodb::bson::{Document, doc, oid::ObjectId};
use nsbridge::auth::AuthSnapshot;
use nsbridge::auth::store::{AuthStore, SnapshotReceiver};
use nsbridge::auth::token::{access_token, api_secret_hash, subject_digest};
use nsbridge::collections::{Collection, CollectionNames};
use nsbridge::delivery::DeliveryWindow;
use nsbridge::feed::{Feed, Route, Scope};
use nsbridge::mapping::{MappingRules, RelayMode};
use nsbridge::settings::ApiSecret;
use support::store::TestStore;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "this is my long pass phrase";
/// The bound: a change to subjects or roles is in effect within this.
const IN_EFFECT_WITHIN: Duration = Duration::from_secs(1);

fn token(id: ObjectId, name: &str) -> String {
    access_token(name, &subject_digest(&api_secret_hash(SECRET), &id.to_hex()))
}

async fn start(db: &Database, default_roles: &[&str]) -> (SnapshotReceiver, CancellationToken) {
    let store = AuthStore::new(
        db.clone(),
        "auth_",
        ApiSecret::new(SECRET),
        default_roles.iter().map(|r| r.to_string()).collect(),
    );
    let mut snapshots = store.snapshots();
    let shutdown = CancellationToken::new();
    let changed = Arc::new(Notify::new());
    let route = Route {
        tenant: Arc::from(db.name()),
        rules: MappingRules {
            relay: RelayMode::Apiv3,
            replace_window_ms: 60_000,
            names: CollectionNames::default(),
        },
        auth_collections: store.collections(),
        auth_changed: changed.clone(),
    };
    let routes = Arc::new(HashMap::from([(db.name().to_string(), route)]));
    let feed = Feed::new(
        db.client().clone(),
        Scope::Database(db.name().to_string()),
        watch::channel(routes).1,
        NonZeroUsize::MIN,
        false,
    );
    // The feed's events are not this test's: taken and dropped.
    let (events, mut dropped) = mpsc::channel(16);
    tokio::spawn(async move { while dropped.recv().await.is_some() {} });
    tokio::spawn(feed.run(events, DeliveryWindow::new(16), shutdown.clone()));
    tokio::spawn(store.run(changed, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(20), snapshots.wait_for(Option::is_some))
        .await
        .expect("auth data loaded")
        .unwrap();
    (snapshots, shutdown)
}

/// Waits until `check` holds for the published snapshot; panics after [`IN_EFFECT_WITHIN`]
/// from `since`.
async fn in_effect(
    snapshots: &mut SnapshotReceiver,
    since: Instant,
    what: &str,
    check: impl Fn(&AuthSnapshot) -> bool,
) {
    let deadline = since + IN_EFFECT_WITHIN;
    loop {
        if let Some(snapshot) = snapshots.borrow_and_update().clone()
            && check(&snapshot)
        {
            return;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(remaining, snapshots.changed())
            .await
            .is_err()
        {
            panic!("{what}: not in effect within {IN_EFFECT_WITHIN:?}");
        }
    }
}

fn readable(snapshot: &AuthSnapshot, token: &str) -> Option<Vec<Collection>> {
    let subject: Arc<_> = snapshot.resolve(token)?;
    Some(
        Collection::ALL
            .into_iter()
            .filter(|c| subject.may_read(*c))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_and_roles_are_followed_while_running() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("auth_follow"));
    let subjects = db.collection::<Document>("auth_subjects");
    let roles = db.collection::<Document>("auth_roles");
    let (mut snapshots, shutdown) = start(&db, &[]).await;

    // A subject inserted while the bridge runs gets a working token.
    let id = ObjectId::new();
    let follower = token(id, "Follower Phone");
    let written = Instant::now();
    subjects
        .insert_one(doc! { "_id": id, "name": "Follower Phone", "roles": ["readable"], "notes": "" })
        .await
        .unwrap();
    in_effect(&mut snapshots, written, "new subject", |s| {
        readable(s, &follower)
            == Some(vec![
                Collection::Devicestatus,
                Collection::Entries,
                Collection::Food,
                Collection::Profile,
                Collection::Treatments,
            ])
    })
    .await;

    // Changing its roles changes its permissions.
    let written = Instant::now();
    subjects
        .update_one(doc! { "_id": id }, doc! { "$set": { "roles": ["entries-only"] } })
        .await
        .unwrap();
    roles
        .insert_one(doc! { "name": "entries-only", "permissions": ["api:entries:read"] })
        .await
        .unwrap();
    in_effect(&mut snapshots, written, "changed roles", |s| {
        readable(s, &follower) == Some(vec![Collection::Entries])
    })
    .await;

    // Changing a role's permissions is followed too.
    let written = Instant::now();
    roles
        .update_one(
            doc! { "name": "entries-only" },
            doc! { "$set": { "permissions": ["api:entries:read", "api:settings:admin"] } },
        )
        .await
        .unwrap();
    in_effect(&mut snapshots, written, "changed role", |s| {
        readable(s, &follower) == Some(vec![Collection::Entries, Collection::Settings])
    })
    .await;

    // Deleting the subject invalidates its token.
    let written = Instant::now();
    subjects.delete_one(doc! { "_id": id }).await.unwrap();
    in_effect(&mut snapshots, written, "deleted subject", |s| {
        s.resolve(&follower).is_none()
    })
    .await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_documents_are_skipped_and_the_rest_work() {
    let store = TestStore::start().await;
    let client = store.client().await;
    let db = client.database(&store.database("auth_malformed"));
    let good = ObjectId::new();
    db.collection::<Document>("auth_roles")
        .insert_many([
            doc! { "name": "broken", "permissions": "api:*:read" },
            doc! { "name": "tx", "permissions": ["api:treatments:read", 42] },
            doc! { "name": "tx", "permissions": ["*"] },
            doc! { "permissions": ["*"] },
        ])
        .await
        .unwrap();
    db.collection::<Document>("auth_subjects")
        .insert_many([
            doc! { "_id": ObjectId::new(), "roles": ["admin"] },
            doc! { "_id": ObjectId::new(), "name": "not-an-array", "roles": "admin" },
            doc! { "_id": good, "name": "good", "roles": ["tx", "broken", "unknown"] },
        ])
        .await
        .unwrap();
    // Default roles: `readable` plus a role that does not exist.
    let (snapshots, shutdown) = start(&db, &["readable", "nonexistent"]).await;
    let snapshot = snapshots.borrow().clone().unwrap();
    assert_eq!(snapshot.len(), 1, "only the well-formed subject");
    let all_but_settings = vec![
        Collection::Devicestatus,
        Collection::Entries,
        Collection::Food,
        Collection::Profile,
        Collection::Treatments,
    ];
    assert_eq!(readable(&snapshot, &token(good, "good")), Some(all_but_settings));
    shutdown.cancel();
}
