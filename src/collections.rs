//! The six logical collections of the `/storage` channel and their MongoDB names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A collection as clients name it (`colName` on the wire, room names, permissions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collection {
    Devicestatus,
    Entries,
    Food,
    Profile,
    Settings,
    Treatments,
}

impl Collection {
    /// In the order Nightscout uses when a client asks for "all collections".
    pub const ALL: [Collection; 6] = [
        Collection::Devicestatus,
        Collection::Entries,
        Collection::Food,
        Collection::Profile,
        Collection::Settings,
        Collection::Treatments,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Collection::Devicestatus => "devicestatus",
            Collection::Entries => "entries",
            Collection::Food => "food",
            Collection::Profile => "profile",
            Collection::Settings => "settings",
            Collection::Treatments => "treatments",
        }
    }

    /// Exact, case-sensitive match, as Nightscout compares names.
    pub fn from_name(name: &str) -> Option<Collection> {
        Collection::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Dense index, for per-collection tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The permission a subject needs to receive this collection's events.
    pub fn read_permission(self) -> &'static str {
        match self {
            Collection::Devicestatus => "api:devicestatus:read",
            Collection::Entries => "api:entries:read",
            Collection::Food => "api:food:read",
            Collection::Profile => "api:profile:read",
            Collection::Settings => "api:settings:admin",
            Collection::Treatments => "api:treatments:read",
        }
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// MongoDB collection name of each logical collection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionNames {
    pub devicestatus: String,
    pub entries: String,
    pub food: String,
    pub profile: String,
    pub settings: String,
    pub treatments: String,
}

impl Default for CollectionNames {
    fn default() -> Self {
        CollectionNames {
            devicestatus: "devicestatus".into(),
            entries: "entries".into(),
            food: "food".into(),
            profile: "profile".into(),
            settings: "settings".into(),
            treatments: "treatments".into(),
        }
    }
}

impl CollectionNames {
    pub fn mongo_name(&self, collection: Collection) -> &str {
        match collection {
            Collection::Devicestatus => &self.devicestatus,
            Collection::Entries => &self.entries,
            Collection::Food => &self.food,
            Collection::Profile => &self.profile,
            Collection::Settings => &self.settings,
            Collection::Treatments => &self.treatments,
        }
    }

    /// The logical collection stored under a MongoDB collection name, if watched.
    pub fn logical(&self, mongo_name: &str) -> Option<Collection> {
        Collection::ALL
            .into_iter()
            .find(|&c| self.mongo_name(c) == mongo_name)
    }

    pub fn mongo_names(&self) -> Vec<&str> {
        Collection::ALL.iter().map(|&c| self.mongo_name(c)).collect()
    }

    /// Two logical collections on one MongoDB collection would make `colName` ambiguous.
    pub fn duplicate(&self) -> Option<&str> {
        let names = self.mongo_names();
        names
            .iter()
            .enumerate()
            .find(|(i, n)| names[i + 1..].contains(n))
            .map(|(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_case_sensitive() {
        for c in Collection::ALL {
            assert_eq!(Collection::from_name(c.name()), Some(c));
        }
        assert_eq!(Collection::from_name("foods"), None);
        assert_eq!(Collection::from_name("Entries"), None);
    }

    #[test]
    fn settings_needs_admin_and_others_read() {
        assert_eq!(Collection::Settings.read_permission(), "api:settings:admin");
        assert_eq!(Collection::Food.read_permission(), "api:food:read");
    }

    #[test]
    fn logical_name_follows_configured_mongo_name() {
        let names = CollectionNames {
            entries: "sgv".into(),
            ..Default::default()
        };
        assert_eq!(names.logical("sgv"), Some(Collection::Entries));
        assert_eq!(names.logical("entries"), None);
        assert_eq!(names.duplicate(), None);
        let clash = CollectionNames {
            food: "treatments".into(),
            ..Default::default()
        };
        assert_eq!(clash.duplicate(), Some("treatments"));
    }
}
