//! nsbridge: Nightscout's APIv3 `/storage` Socket.IO channel, fed by MongoDB change streams.
//!
//! Data flow: [`settings`] → [`feed`] (MongoDB change stream) → [`mapping`] (pure: change
//! event → bridge event) → [`auth`] (tokens and permissions) → [`channel`] (Socket.IO
//! fan-out, paced by the [`delivery`] window; the [`history`] of what was sent, replayed to
//! clients that reconnect) → [`http`] (health, metrics, live page); `main` wires them.
//! [`state`] keeps the position in the stream across restarts; [`upstream`] talks to
//! Nightscout in front-door mode.

pub mod auth;
pub mod channel;
pub mod collections;
pub mod delivery;
pub mod deployment;
pub mod feed;
pub mod history;
pub mod http;
pub mod json_form;
pub mod mapping;
pub mod mongo;
pub mod net;
pub mod server;
pub mod settings;
pub mod sites;
pub mod state;
pub mod telemetry;
pub mod tenants;
pub mod upstream;
