//! The kubegrpc operator binary: parses flags, sets up logging, and runs [`kubegrpc_operator::app`].

#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = kubegrpc_operator::app::Options::parse();
    kubegrpc_operator::app::init_logging(options.log_format);
    kubegrpc_operator::app::run(options).await
}
