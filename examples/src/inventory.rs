//! The `inventory` example service: a tonic service behind
//! `RequireAuthLayer`. `GetStock` needs `inventory:read`, `Reserve` needs
//! `inventory:reserve`; both log who called (subject and actor chain).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use service_sdk::{Claims, RequireAuthLayer, ServiceEnv};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::ServeError;
use crate::shop::inventory_server::{Inventory, InventoryServer};
use crate::shop::{GetStockRequest, GetStockResponse, ReserveRequest, ReserveResponse};

/// The service's audience name.
pub const AUDIENCE: &str = "inventory";

/// In-memory stock.
#[derive(Debug, Clone)]
pub struct InventoryService {
    stock: Arc<Mutex<HashMap<String, u32>>>,
}

impl Default for InventoryService {
    fn default() -> Self {
        let stock = [("sku-1", 1_000), ("sku-2", 50)].into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Self { stock: Arc::new(Mutex::new(stock)) }
    }
}

fn caller(claims: &Claims) {
    tracing::info!(sub = %claims.sub, actors = ?claims.actor_chain(), "inventory called");
}

#[tonic::async_trait]
impl Inventory for InventoryService {
    async fn get_stock(&self, req: Request<GetStockRequest>) -> Result<Response<GetStockResponse>, Status> {
        let claims = Claims::from_request(&req)?;
        claims.require_perm("inventory:read")?;
        caller(claims);
        let stock = self.stock.lock().map_err(|_| Status::internal("stock lock"))?;
        let available = stock.get(&req.get_ref().sku).copied().ok_or_else(|| Status::not_found("unknown sku"))?;
        Ok(Response::new(GetStockResponse { available }))
    }

    async fn reserve(&self, req: Request<ReserveRequest>) -> Result<Response<ReserveResponse>, Status> {
        let claims = Claims::from_request(&req)?.clone();
        claims.require_perm("inventory:reserve")?;
        caller(&claims);
        let r = req.into_inner();
        if r.quantity == 0 || r.quantity > 100 {
            return Err(Status::invalid_argument("quantity must be 1..=100"));
        }
        let mut stock = self.stock.lock().map_err(|_| Status::internal("stock lock"))?;
        let available = stock.get_mut(&r.sku).ok_or_else(|| Status::not_found("unknown sku"))?;
        if *available < r.quantity {
            return Err(Status::failed_precondition("not enough stock"));
        }
        *available -= r.quantity;
        Ok(Response::new(ReserveResponse {
            remaining: *available,
            subject: claims.sub.clone(),
            actors: claims.actor_chain().into_iter().map(str::to_owned).collect(),
            audience: claims.aud.iter().map(str::to_owned).collect(),
        }))
    }
}

/// Serves inventory on `listener` until `shutdown` resolves: mTLS with the
/// service's own certificate (reloaded when rotated), tokens for audience
/// `env.name()` verified against the auth server of `env`.
pub async fn serve(
    listener: TcpListener,
    env: &ServiceEnv,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let verifier = env.verifier(env.auth_channel()?).build()?;
    tonic::transport::Server::builder()
        .layer(RequireAuthLayer::new(verifier))
        .add_service(InventoryServer::new(InventoryService::default()))
        .serve_with_incoming_shutdown(env.incoming(listener)?, shutdown)
        .await?;
    Ok(())
}
