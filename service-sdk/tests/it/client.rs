//! Client side: credentials, token source, AuthChannel, Vault.
