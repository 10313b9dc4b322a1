//! GRPCRoutes (Gateway API, attached to Services): resolved into each GrpcBackend's routing
//! table ([`resolve::table_for`]) and reported in each route's status.

pub mod policy;
pub mod resolve;
