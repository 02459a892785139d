//! The `order` example service: a tonic `Orders` service and an axum HTTP
//! front for end users, `POST /orders`, both behind `RequireAuthLayer`
//! (audience `order`). It calls
//! `inventory` on behalf of the user with a token exchanged through
//! `AuthChannel`, using its own service-account credentials read from a
//! file, as Vault Agent would render it.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use service_sdk::{AuthChannel, BearerToken, Claims, RequireAuthLayer, ServiceEnv, Verifier};
use tokio::net::TcpListener;

use crate::ServeError;
use crate::shop::ReserveRequest;
use crate::shop::ReserveResponse;
use crate::shop::inventory_client::InventoryClient;
use crate::shop::orders_server::{Orders, OrdersServer};

/// The service's audience name.
pub const AUDIENCE: &str = "order";

/// `POST /orders` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderRequest {
    /// Item.
    pub sku: String,
    /// Units.
    pub quantity: u32,
}

/// `POST /orders` answer: what inventory saw, so callers can check it.
#[derive(Debug, Serialize, Deserialize)]
pub struct OrderResponse {
    /// Units left.
    pub remaining: u32,
    /// `sub` as inventory verified it.
    pub inventory_saw_subject: String,
    /// `act` chain as inventory verified it.
    pub inventory_saw_actors: Vec<String>,
    /// `aud` as inventory verified it.
    pub inventory_saw_audience: Vec<String>,
}

#[derive(Clone)]
struct AppState {
    inventory: AuthChannel,
}

/// The router, given a verifier for audience `order` and an `AuthChannel`
/// to inventory.
pub fn router(verifier: Verifier, inventory: AuthChannel) -> Router {
    Router::new()
        .route("/orders", post(place_order))
        .layer(RequireAuthLayer::new(verifier))
        .with_state(Arc::new(AppState { inventory }))
}

async fn place_order(
    State(state): State<Arc<AppState>>,
    Extension(claims): Extension<Claims>,
    Extension(token): Extension<BearerToken>,
    Json(body): Json<OrderRequest>,
) -> Result<Json<OrderResponse>, (StatusCode, String)> {
    claims.require_perm("orders:create").map_err(|s| (StatusCode::FORBIDDEN, s.message().to_owned()))?;
    tracing::info!(sub = %claims.sub, "placing order");
    // The one mapping of token errors: the detail goes to the log, the user
    // gets a fixed message (a refusal of order's own credentials is not the
    // user's fault: 502, not 401).
    let channel = state.inventory.on_behalf_of_token(token.as_str()).await.map_err(|e| {
        let status = tonic::Status::from(e);
        (http_status(status.code()), status.message().to_owned())
    })?;
    let res = InventoryClient::new(channel)
        .reserve(ReserveRequest { sku: body.sku, quantity: body.quantity })
        .await
        .map_err(|s| (http_status(s.code()), s.message().to_owned()))?
        .into_inner();
    Ok(Json(OrderResponse {
        remaining: res.remaining,
        inventory_saw_subject: res.subject,
        inventory_saw_actors: res.actors,
        inventory_saw_audience: res.audience,
    }))
}

/// The gRPC face: the same order, placed through the SDK's one-line
/// on-behalf-of call.
#[derive(Clone)]
pub struct OrdersService {
    inventory: AuthChannel,
}

#[tonic::async_trait]
impl Orders for OrdersService {
    async fn place_order(
        &self,
        request: tonic::Request<ReserveRequest>,
    ) -> Result<tonic::Response<ReserveResponse>, tonic::Status> {
        Claims::from_request(&request)?.require_perm("orders:create")?;
        let mut inventory = InventoryClient::new(self.inventory.on_behalf_of(&request).await?);
        inventory.reserve(request.into_inner()).await
    }
}

fn http_status(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Serves order's HTTP front on `http` and its mTLS gRPC face on `grpc`
/// until `shutdown`, calling inventory at `inventory_uri`.
pub async fn serve(
    http: TcpListener,
    grpc: TcpListener,
    env: &ServiceEnv,
    inventory_uri: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let auth = env.auth_channel()?;
    let verifier = env.verifier(auth.clone()).build()?;
    // The audiences order calls: fetched in one ExchangeTokens call now and
    // renewed together; it serves once they are in (or after 10 s, when
    // the auth service is slow to come up: the source keeps trying).
    let source = env.token_source(auth).audiences([crate::inventory::AUDIENCE]).build();
    match tokio::time::timeout(std::time::Duration::from_secs(10), source.ready()).await {
        Ok(Ok(())) => tracing::info!("tokens for inventory ready"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the auth service refuses order's own tokens; serving anyway"),
        Err(_) => tracing::warn!("no tokens yet after 10 s; serving, calls wait for them"),
    }
    let inventory =
        AuthChannel::new(env.channel(inventory_uri, crate::inventory::AUDIENCE)?, source, crate::inventory::AUDIENCE);
    let incoming = env.incoming(grpc)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let grpc_server = tonic::transport::Server::builder()
        .layer(RequireAuthLayer::new(verifier.clone()))
        .add_service(OrdersServer::new(OrdersService { inventory: inventory.clone() }))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    let http_server = axum::serve(http, router(verifier, inventory)).with_graceful_shutdown(stopped(stop_rx));
    let (g, h) = tokio::join!(grpc_server, async { http_server.await });
    g?;
    Ok(h?)
}
