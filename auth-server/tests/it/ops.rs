//! What operators' tools expect of a running server: gRPC reflection in
//! both versions (grpcurl before 1.9 and Python's grpcio-reflection speak
//! only v1alpha), RFC 8414 discovery and the HTTP JWKS with its cache
//! headers on the side port, and the side port over TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use prost::Message as _;
use testkit::TestServer;
use tonic::transport::Channel;

use crate::within;

/// What a reflection server answered: the services it lists, and the
/// names of the file descriptor that defines `auth.v1.Auth` and of its
/// services and their methods.
#[derive(Debug, PartialEq, Eq)]
struct Reflected {
    services: Vec<String>,
    file: String,
    methods: Vec<String>,
}

/// `ListServices`, then `FileContainingSymbol("auth.v1.Auth")`, over one
/// `grpc.reflection.v1alpha` stream.
async fn reflect_v1alpha(channel: Channel) -> Result<Reflected, tonic::Status> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};

    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(auth_proto::SERVICE_NAME.into()),
    ]
    .map(|r| ServerReflectionRequest { host: String::new(), message_request: Some(r) });
    let mut answers =
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
    let mut next = async || -> Result<MessageResponse, tonic::Status> {
        let ServerReflectionResponse { message_response, .. } =
            answers.message().await?.ok_or_else(|| tonic::Status::internal("stream ended early"))?;
        message_response.ok_or_else(|| tonic::Status::internal("empty answer"))
    };
    let MessageResponse::ListServicesResponse(list) = next().await? else { panic!("not a service list") };
    let MessageResponse::FileDescriptorResponse(files) = next().await? else { panic!("not a file descriptor") };
    Ok(reflected(list.service.into_iter().map(|s| s.name).collect(), &files.file_descriptor_proto))
}

/// The same over `grpc.reflection.v1`.
async fn reflect_v1(channel: Channel) -> Result<Reflected, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(auth_proto::SERVICE_NAME.into()),
    ]
    .map(|r| ServerReflectionRequest { host: String::new(), message_request: Some(r) });
    let mut answers =
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
    let mut next = async || -> Result<MessageResponse, tonic::Status> {
        let ServerReflectionResponse { message_response, .. } =
            answers.message().await?.ok_or_else(|| tonic::Status::internal("stream ended early"))?;
        message_response.ok_or_else(|| tonic::Status::internal("empty answer"))
    };
    let MessageResponse::ListServicesResponse(list) = next().await? else { panic!("not a service list") };
    let MessageResponse::FileDescriptorResponse(files) = next().await? else { panic!("not a file descriptor") };
    Ok(reflected(list.service.into_iter().map(|s| s.name).collect(), &files.file_descriptor_proto))
}

fn reflected(mut services: Vec<String>, files: &[Vec<u8>]) -> Reflected {
    services.sort_unstable();
    let protos: Vec<prost_types::FileDescriptorProto> =
        files.iter().map(|f| prost_types::FileDescriptorProto::decode(f.as_slice()).unwrap()).collect();
    let auth = protos.iter().find(|p| p.package() == "auth.v1").expect("the auth.v1 file among the answer");
    let mut methods: Vec<String> = auth
        .service
        .iter()
        .flat_map(|s| s.method.iter().map(move |m| format!("{}.{}/{}", auth.package(), s.name(), m.name())))
        .collect();
    methods.sort_unstable();
    Reflected { services, file: auth.name().to_owned(), methods }
}

fn expected(reflection_service: &str) -> Reflected {
    let mut services =
        vec![auth_proto::SERVICE_NAME.to_owned(), "grpc.health.v1.Health".to_owned(), reflection_service.to_owned()];
    services.sort_unstable();
    let methods = ["ExchangeToken", "GetJwks", "Login", "Refresh", "Revoke", "WatchRevocations"]
        .map(|m| format!("auth.v1.Auth/{m}"))
        .to_vec();
    Reflected { services, file: "auth/v1/auth.proto".into(), methods }
}

#[tokio::test]
async fn reflection_v1alpha_lists_the_auth_service_and_serves_its_descriptor() {
    let srv = TestServer::start().await;
    let got = within("v1alpha reflection", reflect_v1alpha(srv.channel("admin").await)).await;
    assert_eq!(got.unwrap(), expected("grpc.reflection.v1alpha.ServerReflection"));
}

#[tokio::test]
async fn reflection_v1_lists_the_auth_service_and_serves_its_descriptor() {
    let srv = TestServer::start().await;
    let got = within("v1 reflection", reflect_v1(srv.channel("admin").await)).await;
    assert_eq!(got.unwrap(), expected("grpc.reflection.v1.ServerReflection"));
}
