//! Who may receive which collection, decided as Nightscout decides it: access tokens
//! derived from API_SECRET, subjects and roles from `<prefix>subjects` and
//! `<prefix>roles`, shiro-style permissions.

pub mod permission;
pub mod snapshot;
pub mod store;
pub mod throttle;
pub mod token;

pub use snapshot::{AuthSnapshot, Subject};
