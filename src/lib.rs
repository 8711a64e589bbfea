//! keycloak-notifier: polls the Keycloak admin REST API for events and mails
//! each new one to administrators.
//!
//! `main.rs` only wires these modules together.
#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod cursor;
pub mod daemon;
pub mod deadletter;
pub mod event;
pub mod event_types;
pub mod health;
pub mod http;
pub mod keycloak;
pub mod mail;
pub mod metrics;
pub mod poller;
pub mod retry;
pub mod smtp;
pub mod telemetry;
pub mod templates;
pub mod tls;
