//! Temporary: the verify tests alone while client.rs is in progress.
#[path = "it/verify.rs"]
mod verify;
