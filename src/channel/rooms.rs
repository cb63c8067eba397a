//! Who is in which collection's room, and on whose authority.
//!
//! Each room membership remembers the subject whose token granted it, so that when
//! subjects or roles change exactly the memberships that lost their grant are dropped.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::auth::AuthSnapshot;
use crate::collections::Collection;

pub struct Rooms<K, S> {
    members: HashMap<K, Grants>,
    rooms: [HashMap<K, S>; Collection::ALL.len()],
}

/// Per collection, the subject (`_id`) whose grant keeps the socket in that room.
#[derive(Default)]
struct Grants([Option<Arc<str>>; Collection::ALL.len()]);

impl<K: Copy + Eq + Hash, S: Clone> Default for Rooms<K, S> {
    fn default() -> Self {
        Rooms {
            members: HashMap::new(),
            rooms: Default::default(),
        }
    }
}

impl<K: Copy + Eq + Hash, S: Clone> Rooms<K, S> {
    /// Adds the socket to the rooms of `collections`; rooms joined earlier stay.
    pub fn join(&mut self, key: K, socket: &S, subject_id: &str, collections: &[Collection]) {
        let subject: Arc<str> = Arc::from(subject_id);
        let grants = self.members.entry(key).or_default();
        for &collection in collections {
            grants.0[collection.index()] = Some(subject.clone());
            self.rooms[collection.index()].insert(key, socket.clone());
        }
    }

    /// Takes the socket out of the rooms of `collections`.
    pub fn leave(&mut self, key: K, collections: &[Collection]) {
        let Some(grants) = self.members.get_mut(&key) else {
            return;
        };
        for &collection in collections {
            grants.0[collection.index()] = None;
            self.rooms[collection.index()].remove(&key);
        }
        if grants.0.iter().all(Option::is_none) {
            self.members.remove(&key);
        }
    }

    /// Forgets a socket entirely (it disconnected); false when it was in no room.
    pub fn remove(&mut self, key: K) -> bool {
        let Some(grants) = self.members.remove(&key) else {
            return false;
        };
        for collection in Collection::ALL {
            if grants.0[collection.index()].is_some() {
                self.rooms[collection.index()].remove(&key);
            }
        }
        true
    }

    /// Drops every membership whose subject is gone or may no longer read the room's
    /// collection. Returns, per affected socket, the rooms it left.
    pub fn recheck(&mut self, snapshot: &AuthSnapshot) -> Vec<(K, Vec<Collection>)> {
        let mut left_by_socket = Vec::new();
        for (key, grants) in &mut self.members {
            let mut left = Vec::new();
            for collection in Collection::ALL {
                let slot = &mut grants.0[collection.index()];
                let still_granted = slot
                    .as_deref()
                    .map(|id| snapshot.subject(id).is_some_and(|s| s.may_read(collection)));
                if still_granted == Some(false) {
                    *slot = None;
                    self.rooms[collection.index()].remove(key);
                    left.push(collection);
                }
            }
            if !left.is_empty() {
                left_by_socket.push((*key, left));
            }
        }
        self.members
            .retain(|_, grants| grants.0.iter().any(Option::is_some));
        left_by_socket
    }

    pub fn room(&self, collection: Collection) -> impl Iterator<Item = (&K, &S)> {
        self.rooms[collection.index()].iter()
    }

    pub fn room_len(&self, collection: Collection) -> usize {
        self.rooms[collection.index()].len()
    }

    pub fn rooms_of(&self, key: K) -> Vec<Collection> {
        Collection::ALL
            .into_iter()
            .filter(|c| self.rooms[c.index()].contains_key(&key))
            .collect()
    }

    /// The rooms of `key`, each with the subject whose grant keeps it there.
    pub fn grants_of(&self, key: K) -> Vec<(Collection, Arc<str>)> {
        let Some(grants) = self.members.get(&key) else {
            return Vec::new();
        };
        Collection::ALL
            .into_iter()
            .filter_map(|c| Some((c, grants.0[c.index()].clone()?)))
            .collect()
    }

    /// Each socket in at least one room, once.
    pub fn members(&self) -> impl Iterator<Item = (&K, &S)> {
        self.members.iter().filter_map(|(key, grants)| {
            let room = grants.0.iter().position(Option::is_some)?;
            self.rooms[room].get_key_value(key)
        })
    }

    /// The socket `key`, if it is in a room.
    pub fn member(&self, key: K) -> Option<&S> {
        let grants = self.members.get(&key)?;
        let room = grants.0.iter().position(Option::is_some)?;
        self.rooms[room].get(&key)
    }

    /// Sockets in at least one room.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Collection::*;
    use bson::{Document, doc, oid::ObjectId};

    const A: &str = "5f1e4b2a9c8d7e6f5a4b3c2d";
    const B: &str = "65a1b2c3d4e5f60718293a4b";

    fn snapshot(subjects: &[(&str, &[&str])]) -> AuthSnapshot {
        let docs: Vec<Document> = subjects
            .iter()
            .map(|(id, roles)| doc! { "_id": ObjectId::parse_str(id).unwrap(), "name": *id, "roles": *roles })
            .collect();
        let roles = [doc! { "name": "entries-only", "permissions": ["api:entries:read"] }];
        AuthSnapshot::build("this is my long pass phrase", &docs, &roles, &[]).0
    }

    fn members(rooms: &Rooms<u32, &'static str>, c: Collection) -> Vec<u32> {
        let mut keys: Vec<u32> = rooms.room(c).map(|(k, _)| *k).collect();
        keys.sort();
        keys
    }

    #[test]
    fn joins_accumulate_and_remove_forgets() {
        let mut rooms = Rooms::default();
        rooms.join(1, &"s1", A, &[Entries, Treatments, Treatments]);
        rooms.join(1, &"s1", A, &[Profile]);
        rooms.join(2, &"s2", B, &[Entries]);
        assert_eq!(rooms.rooms_of(1), [Entries, Profile, Treatments]);
        assert_eq!(members(&rooms, Entries), [1, 2]);
        assert_eq!(rooms.room_len(Treatments), 1);
        assert_eq!(rooms.len(), 2);
        let mut everyone: Vec<(u32, &str)> = rooms.members().map(|(k, s)| (*k, *s)).collect();
        everyone.sort();
        assert_eq!(everyone, [(1, "s1"), (2, "s2")]);
        assert_eq!(rooms.member(2), Some(&"s2"));
        assert_eq!(rooms.member(3), None);
        let grants: Vec<(Collection, String)> = rooms
            .grants_of(1)
            .into_iter()
            .map(|(c, s)| (c, s.to_string()))
            .collect();
        assert_eq!(
            grants,
            [
                (Entries, A.to_string()),
                (Profile, A.to_string()),
                (Treatments, A.to_string())
            ]
        );
        assert!(rooms.grants_of(9).is_empty());
        rooms.leave(1, &[Entries, Treatments]);
        assert_eq!(rooms.rooms_of(1), [Profile]);
        rooms.leave(1, &[Profile]);
        assert!(rooms.grants_of(1).is_empty());
        assert!(!rooms.remove(1), "in no room any more");
        rooms.join(1, &"s1", A, &[Entries, Profile, Treatments]);
        assert!(rooms.remove(1));
        assert!(!rooms.remove(1));
        assert_eq!(rooms.member(1), None, "removed");
        assert_eq!(members(&rooms, Entries), [2]);
        assert_eq!(rooms.room_len(Treatments), 0);
        assert_eq!(rooms.len(), 1);
    }

    #[test]
    fn recheck_drops_exactly_the_lost_grants() {
        let mut rooms = Rooms::default();
        rooms.join(1, &"s1", A, &[Entries, Treatments]);
        rooms.join(1, &"s1", B, &[Food]);
        rooms.join(2, &"s2", B, &[Entries]);
        // A is now entries-only; B keeps admin.
        let left = rooms.recheck(&snapshot(&[(A, &["entries-only"]), (B, &["admin"])]));
        assert_eq!(left, vec![(1, vec![Treatments])]);
        assert_eq!(rooms.rooms_of(1), [Entries, Food]);
        // B is deleted: socket 1 keeps A's entries, socket 2 leaves everything.
        let mut left = rooms.recheck(&snapshot(&[(A, &["entries-only"])]));
        left.sort();
        assert_eq!(left, vec![(1, vec![Food]), (2, vec![Entries])]);
        assert_eq!(rooms.rooms_of(1), [Entries]);
        assert!(rooms.rooms_of(2).is_empty());
        assert_eq!(rooms.len(), 1);
        // Nothing changed: nothing left.
        assert!(rooms.recheck(&snapshot(&[(A, &["entries-only"])])).is_empty());
    }
}
