//! Writes acknowledged only once durable on replicas (`redis.min_replicas_acked`).
//!
//! Redis replicates asynchronously: a primary answers a write as soon as it
//! has applied it, and a primary lost a moment later (a SIGKILL, a machine
//! gone, a failover) takes the writes its replicas had not yet received
//! with it. A revocation acknowledged then and lost would be a revoked
//! token that works again.
//!
//! So with `min_replicas_acked = n > 0` every write script (revoke, refresh
//! rotation, refresh issue, registry entry) goes out in a pipeline with
//! `WAIT n timeout` right behind it, on the same connection: `WAIT` counts
//! the replicas that have everything this connection wrote, so it must run
//! on the connection that wrote (a pooled connection chosen per call would
//! wait for another connection's writes). The pipeline is routed to the
//! node that owns the script's slot and follows no cluster redirection: a
//! script sent elsewhere would leave `WAIT` counting for a write it never
//! saw. Fewer than `n` replicas within `redis.replica_ack_timeout_ms` is
//! [`StoreError::NotDurable`]: the write may exist on the primary (and may
//! have been published) but it is not acknowledged, and the RPC answers
//! `UNAVAILABLE`; the client's retry is safe (a revocation is idempotent, a
//! refresh retry is a reuse or, within `tokens.refresh_reuse_grace_secs`,
//! a retry).
//!
//! `WAIT` blocks the connection it runs on until enough replicas answer or
//! the timeout passes (the whole `replica_ack_timeout_ms` while a replica
//! is slow or gone), and a command behind it on that connection waits as
//! long. So durable writes have connections of their own
//! (`redis.durable_pool_size`, by default half of `redis.pool_size`):
//! reads (refresh records, snapshots, readiness) never wait behind a
//! `WAIT`; durable writes wait behind each other's only when more are in
//! flight than there are such connections.
//!
//! `WAIT` does not make a write durable on the replicas' disks, only
//! present in their memory: with `n` replicas it survives the loss of up to
//! `n` machines at once, as long as a replica that has it is the one
//! promoted (Sentinel and Redis Cluster promote the most up-to-date one).

use fred::clients::Pipeline;
use fred::interfaces::ClientLike as _;
use fred::prelude::{Error as RedisError, FromValue, ServerInterface as _, Value};
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};
use service_sdk::redis_layout::{ScriptCall, common_slot};

use super::{Shared, map_error};
use crate::store::StoreError;

/// How many replicas must acknowledge a write, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Durability {
    /// `redis.min_replicas_acked`; 0 = the primary's own reply is enough.
    pub(super) replicas: u32,
    /// `redis.replica_ack_timeout_ms`.
    pub(super) timeout_ms: u64,
}

impl Shared {
    /// Runs a write script and acknowledges it only once the configured
    /// number of replicas has it (see the module docs); with none
    /// required, a plain script call.
    pub(super) async fn write<R: FromValue>(&self, call: ScriptCall<'_>) -> Result<R, StoreError> {
        if self.durability.replicas == 0 {
            return self.eval(call).await;
        }
        self.layout_claimed().await?;
        let (value, acked) = self.write_durably(&call).await?;
        match acked {
            None => value.convert().map_err(map_error),
            Some(acked) => Err(StoreError::NotDurable { acked, wanted: self.durability.replicas }),
        }
    }

    /// [`write`](Self::write) with replicas required, without waiting for
    /// the layout marker (its claim is such a write): the script's reply,
    /// and how many replicas acknowledged it when fewer than required.
    pub(super) async fn write_durably(&self, call: &ScriptCall<'_>) -> Result<(Value, Option<u64>), StoreError> {
        let mut written = self.unchecked(self.write_and_wait(call, false)).await?;
        if matches!(written, Written::NoScript) {
            written = self.unchecked(self.write_and_wait(call, true)).await?;
        }
        match written {
            Written::Value(value) => Ok((value, None)),
            Written::NotDurable { value, acked } => Ok((value, Some(acked))),
            Written::NoScript => Err(StoreError::Unavailable("redis script cache flushed while writing".into())),
        }
    }

    /// One pipeline: the script (`EVALSHA`, or `EVAL` with `source`), then
    /// `WAIT`, on one connection of the node owning the script's slot.
    async fn write_and_wait(&self, call: &ScriptCall<'_>, source: bool) -> Result<Written, RedisError> {
        let wanted = self.durability.replicas;
        let options = Options {
            cluster_hash: common_slot(call.keys()).map(ClusterHash::Custom),
            max_redirections: Some(0),
            max_attempts: Some(1),
            ..Options::default()
        };
        // The durable writes' own connections: `WAIT` blocks the one it
        // runs on, and no read may queue behind it.
        let pool = self.durable_pool.as_ref().unwrap_or(&self.pool);
        let pipeline = Pipeline::from(pool.next().with_options(&options));
        let script = call.script();
        let (command, body) = if source { ("EVAL", script.lua()) } else { ("EVALSHA", script.sha()) };
        let mut args: Vec<Value> = Vec::with_capacity(2 + call.keys().len() + call.args().len());
        args.push(body.into());
        args.push((call.keys().len() as i64).into());
        args.extend(call.keys().iter().map(|k| Value::from(k.as_str())));
        args.extend(call.args().iter().map(|a| Value::from(a.as_str())));
        let _: Value = pipeline.custom(CustomCommand::new_static(command, ClusterHash::Offset(2), false), args).await?;
        let _: Value = pipeline.wait(i64::from(wanted), self.durability.timeout_ms as i64).await?;
        let mut replies = pipeline.try_all::<Value>().await.into_iter();
        let (Some(written), Some(acked)) = (replies.next(), replies.next()) else {
            return Err(RedisError::new(fred::error::ErrorKind::Protocol, "pipeline reply missing"));
        };
        let value = match written {
            Err(e) if !source && e.details().starts_with("NOSCRIPT") => return Ok(Written::NoScript),
            other => other?,
        };
        let acked = acked?.as_i64().unwrap_or(0).max(0) as u64;
        if acked < u64::from(wanted) {
            tracing::warn!(acked, wanted, "redis write not acknowledged by enough replicas: refused as not durable");
            return Ok(Written::NotDurable { value, acked });
        }
        Ok(Written::Value(value))
    }
}

/// What a write pipeline found.
enum Written {
    /// Written, and on enough replicas.
    Value(Value),
    /// Redis does not have the script cached: nothing ran.
    NoScript,
    /// Written on the primary (the script's reply), on only `acked`
    /// replicas in time.
    NotDurable { value: Value, acked: u64 },
}
