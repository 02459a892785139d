//! The auth.v1.Auth token service.
pub mod clock;
pub mod store;
