//! nsbridge: Nightscout's APIv3 `/storage` Socket.IO channel, fed by MongoDB change streams.
//!
//! Data flow: [`settings`] → [`feed`] (MongoDB change stream) → [`mapping`] (pure: change
//! event → bridge event) → [`auth`] (tokens and permissions) → [`channel`] (Socket.IO
//! fan-out, paced by the [`delivery`] window) → [`http`] (health, metrics, live page); `main` wires them.

pub mod auth;
pub mod channel;
pub mod collections;
pub mod delivery;
pub mod feed;
pub mod http;
pub mod json_form;
pub mod mapping;
pub mod mongo;
pub mod net;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod upstream;
