//! The backend's TCP connections: counted as they open and close, and all failed at once when
//! the backend is killed.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, task::AtomicWaker};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::Connected;

use crate::Counters;

/// What [`Backend::kill`] pulls: once pulled, every connection's I/O fails at once.
///
/// Each open connection registers the waker of the task serving it, so that an idle
/// connection (whose task waits on a read) wakes up to fail too.
#[derive(Default)]
pub(crate) struct KillSwitch {
    killed: AtomicBool,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
}

impl KillSwitch {
    pub(crate) fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for waker in connections.values() {
            waker.wake();
        }
    }

    pub(crate) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    pub(crate) fn register(&self) -> (u64, Arc<AtomicWaker>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        connections.insert(id, waker.clone());
        (id, waker)
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// Accepted connections, counted as they open and close.
pub(crate) struct CountingIncoming {
    listener: TcpListener,
    counters: Arc<Counters>,
    kill_switch: Arc<KillSwitch>,
}

impl CountingIncoming {
    pub(crate) fn new(listener: TcpListener, counters: Arc<Counters>, kill_switch: Arc<KillSwitch>) -> Self {
        Self {
            listener,
            counters,
            kill_switch,
        }
    }
}

impl Stream for CountingIncoming {
    type Item = std::io::Result<CountedConnection>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => {
                let _ = stream.set_nodelay(true);
                self.counters.connections_accepted.fetch_add(1, Ordering::SeqCst);
                self.counters.connections_open.fetch_add(1, Ordering::SeqCst);
                let (id, waker) = self.kill_switch.register();
                Poll::Ready(Some(Ok(CountedConnection {
                    stream,
                    counters: self.counters.clone(),
                    kill_switch: self.kill_switch.clone(),
                    id,
                    waker,
                    reset: false,
                })))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A TCP connection that counts itself closed when dropped, and fails at once once its
/// backend is killed.
pub(crate) struct CountedConnection {
    stream: TcpStream,
    counters: Arc<Counters>,
    kill_switch: Arc<KillSwitch>,
    id: u64,
    waker: Arc<AtomicWaker>,
    reset: bool,
}

impl CountedConnection {
    /// The error every I/O gets once the backend is killed; the first time, the socket is set
    /// to be reset (RST) rather than closed in order when it is dropped, as the kernel does
    /// with the sockets of a killed process that had data unread.
    fn killed(&mut self) -> Option<std::io::Error> {
        if !self.kill_switch.is_killed() {
            return None;
        }
        if !self.reset {
            self.reset = true;
            // SO_LINGER 0: the close is a reset and never blocks.
            #[allow(deprecated)]
            let _ = self.stream.set_linger(Some(Duration::ZERO));
        }
        Some(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the backend was killed",
        ))
    }
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.counters.connections_open.fetch_sub(1, Ordering::SeqCst);
        self.kill_switch.unregister(self.id);
    }
}

impl Connected for CountedConnection {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for CountedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        // The serving task always waits on a read: registered here, a kill wakes it.
        self.waker.register(cx.waker());
        if let Some(error) = self.killed() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Some(error) = self.killed() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(error) = self.killed() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(error) = self.killed() {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
