//! Verify side: RequireAuthLayer, JWKS cache, revocation feed.
