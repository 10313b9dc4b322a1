//! A TCP proxy in front of a backend that can be switched to reset every connection: a backend
//! the operator may still list Serving while every request to it fails at the transport level.
//! And an address that refuses every connection, from the start.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tokio_util::task::AbortOnDropHandle;

use crate::netns::assert_private_network;

/// A proxy on `address` to an upstream; stops when dropped.
pub struct ResettingProxy {
    pub address: SocketAddr,
    resetting: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    _task: AbortOnDropHandle<()>,
}

impl ResettingProxy {
    /// Listens on `address` and forwards every connection to `upstream`.
    pub async fn start(address: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        assert_private_network();
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        let (resetting, switch) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(client, upstream, switch.clone()));
            }
        });
        Ok(Self {
            address,
            resetting,
            accepted,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// From now on, reset every connection (the open ones too) or forward them again.
    pub fn set_resetting(&self, resetting: bool) {
        self.resetting.send_replace(resetting);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mut resetting: watch::Receiver<bool>) {
    if *resetting.borrow_and_update() {
        reset(client);
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = resetting.wait_for(|resetting| *resetting) => reset(client),
    }
}

/// Closes with a TCP RST rather than a FIN.
fn reset(stream: TcpStream) {
    // SO_LINGER 0 turns the close into a reset; with a zero timeout nothing blocks.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// An address where every connection is refused at connect time (the kernel answers the SYN with
/// a reset), from the first: a request sent there certainly never reached a backend. The
/// address is bound, not listened on, so nothing else can take it while this lives.
///
/// Unlike a listener closed after clients connected, nothing here depends on timing: a closing
/// listener completes handshakes into its backlog until it is gone, and a request written on
/// such a connection may count as sent.
pub struct RefusingAddress {
    pub address: SocketAddr,
    _bound: TcpSocket,
}

impl RefusingAddress {
    pub fn reserve(address: SocketAddr) -> Result<Self> {
        assert_private_network();
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        // Every test process hands out addresses from the same start, so an earlier test binary's
        // connections to this address may still be in TIME_WAIT: without SO_REUSEADDR (which
        // listeners set) the bind fails with EADDRINUSE. Nothing listens here either way.
        socket.set_reuseaddr(true)?;
        socket.bind(address).with_context(|| format!("cannot bind {address}"))?;
        Ok(Self {
            address,
            _bound: socket,
        })
    }
}
