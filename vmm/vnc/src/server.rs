//! The VNC listener: binds the socket, accepts clients (each on its own thread, up to a
//! limit), keeps statistics, and on drop stops accepting and disconnects every client.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{client, FrameSource, InputSink, VncError};

/// Server settings; [`VncConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct VncConfig {
    pub listen: SocketAddr,
    /// VNC Authentication password (only the first 8 bytes count); None or empty = no auth.
    pub password: Option<String>,
    /// Desktop name shown by viewers.
    pub name: String,
    /// A client must finish the handshake within this time.
    pub handshake_timeout: Duration,
    /// A client whose socket accepts no data for this long is disconnected.
    pub write_timeout: Duration,
    /// Connections beyond this many are closed at once.
    pub max_clients: usize,
}

impl VncConfig {
    pub fn new(listen: SocketAddr) -> VncConfig {
        VncConfig {
            listen,
            password: None,
            name: "DeskVM".to_string(),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_clients: 16,
        }
    }
}

/// Counters since the server started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VncStats {
    /// Bytes of FramebufferUpdate messages written.
    pub bytes_sent: u64,
    /// FramebufferUpdate messages written.
    pub updates_sent: u64,
    /// Clients connected now (including those still in the handshake).
    pub clients: usize,
    /// Connections accepted in total.
    pub connections: u64,
}

pub(crate) struct ServerShared {
    pub source: Arc<dyn FrameSource>,
    pub input: Arc<dyn InputSink>,
    pub config: VncConfig,
    pub stop: AtomicBool,
    pub bytes_sent: AtomicU64,
    pub updates_sent: AtomicU64,
    connections: AtomicU64,
    clients: AtomicUsize,
    streams: Mutex<HashMap<u64, TcpStream>>,
}

/// A running VNC server; dropping it stops the server and disconnects all clients.
pub struct VncServer {
    shared: Arc<ServerShared>,
    local_addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl VncServer {
    /// Starts a server on `listen` with default settings.
    pub fn start(
        listen: SocketAddr,
        password: Option<String>,
        source: Arc<dyn FrameSource>,
        input: Arc<dyn InputSink>,
    ) -> Result<VncServer, VncError> {
        let mut config = VncConfig::new(listen);
        config.password = password;
        VncServer::start_with_config(config, source, input)
    }

    pub fn start_with_config(
        config: VncConfig,
        source: Arc<dyn FrameSource>,
        input: Arc<dyn InputSink>,
    ) -> Result<VncServer, VncError> {
        let listen = config.listen;
        let listener = TcpListener::bind(listen).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                VncError::AddressInUse(listen)
            } else {
                VncError::Bind {
                    addr: listen,
                    source,
                }
            }
        })?;
        let bind_error = |source| VncError::Bind {
            addr: listen,
            source,
        };
        let local_addr = listener.local_addr().map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        if config.password.as_deref().is_some_and(|p| p.len() > 8) {
            log::warn!("VNC: only the first 8 characters of the password are used");
        }
        let shared = Arc::new(ServerShared {
            source,
            input,
            config,
            stop: AtomicBool::new(false),
            bytes_sent: AtomicU64::new(0),
            updates_sent: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            clients: AtomicUsize::new(0),
            streams: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vnc-accept".into())
                .spawn(move || accept_loop(shared, listener))
                .map_err(VncError::Thread)?
        };
        log::info!("VNC server listening on {local_addr}");
        Ok(VncServer {
            shared,
            local_addr,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn client_count(&self) -> usize {
        self.shared.clients.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> VncStats {
        VncStats {
            bytes_sent: self.shared.bytes_sent.load(Ordering::Relaxed),
            updates_sent: self.shared.updates_sent.load(Ordering::Relaxed),
            clients: self.client_count(),
            connections: self.shared.connections.load(Ordering::Relaxed),
        }
    }
}

impl Drop for VncServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in lock_streams(&self.shared).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Client threads notice within their poll interval; do not hang forever.
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.client_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn lock_streams(shared: &ServerShared) -> std::sync::MutexGuard<'_, HashMap<u64, TcpStream>> {
    shared.streams.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(shared: Arc<ServerShared>, listener: TcpListener) {
    let mut next_id = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                log::warn!("VNC: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        if shared.clients.load(Ordering::SeqCst) >= shared.config.max_clients {
            log::warn!(
                "VNC: refusing {peer}: already {} clients",
                shared.config.max_clients
            );
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        if let Err(e) = stream.set_nonblocking(false) {
            log::warn!("VNC: cannot configure connection from {peer}: {e}");
            continue;
        }
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        lock_streams(&shared).insert(id, registered);
        shared.clients.fetch_add(1, Ordering::SeqCst);
        log::info!("VNC client {peer} connected");
        let thread_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("vnc-client".into())
            .spawn(move || {
                client::serve(Arc::clone(&thread_shared), stream);
                lock_streams(&thread_shared).remove(&id);
                thread_shared.clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::warn!("VNC: cannot start a thread for {peer}: {e}");
            if let Some(stream) = lock_streams(&shared).remove(&id) {
                let _ = stream.shutdown(Shutdown::Both);
            }
            shared.clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
