//! Configuration sources: they turn Kubernetes objects into the typed [`model`](crate::model)
//! and publish snapshots through the [`Store`](crate::model::Store).
//!
//! The modules form a star, and imports only point down it:
//!
//! | layer | modules | imports from `source/` |
//! |---|---|---|
//! | sources | [`file`], [`kube`] | `ledger`, `objects` |
//! | resolver of `DNS` ServiceEntries | [`dns`] | nothing (it writes through the `Store`) |
//! | the rule and assembly | [`ledger`] → [`assemble`] | `objects` |
//! | dispatcher | [`objects`]: kind → translator | the translators, `fields` |
//! | translators | `core`, `istio`, `gateway`, `security` | `fields`, `validate` |
//! | field reader | `fields` → `validate` | nothing else |
//!
//! So a directory of YAML and a cluster produce the same model: both hand every resource to
//! the dispatcher and every result to the [`Ledger`], where one rule rejects a resource that
//! fails validation alone, with a [`Rejection`] naming the resource and the field, and keeps
//! its last good version in force; the incremental [`Assembler`] turns what is in force into
//! snapshots.

pub mod assemble;
pub mod dns;
pub mod file;
pub mod kube;
pub mod ledger;
pub mod objects;
pub mod yaml;

mod core;
mod fields;
mod gateway;
mod istio;
mod security;
mod telemetry;
mod validate;

pub use assemble::{assemble, Assembler};
pub use ledger::{Ledger, Rejection, SourceStatus};
pub use objects::{EndpointSlice, Kind, Object, ResourceId};
