//! Runnable example services built on `service-sdk`.
