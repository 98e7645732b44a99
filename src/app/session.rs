//! A running VM as the app sees it: the engine handle, its event stream, and the last
//! statistics snapshot for rates. Created when the user runs a VM, dropped (which powers
//! the VM off) when it stops or the app quits.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use vmm::{Event, VmConfig, VmHandle, VmState, VmStats};

use super::perf_model::{sample, PerfSample};

pub struct Session {
    pub handle: Arc<VmHandle>,
    events: Receiver<Event>,
    last_stats: Option<VmStats>,
    /// The display generation of the library thumbnail.
    pub thumbnail_generation: u64,
}

/// What changed since the last poll.
pub struct Poll {
    pub state: VmState,
    pub events: Vec<Event>,
    pub sample: Option<PerfSample>,
    pub stats: VmStats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.handle.state())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Builds and starts the VM on a worker thread (opening images, allocating guest RAM
    /// and loading firmware take long enough to stall the window), then hands the
    /// outcome to `done` on that thread.
    pub fn start_in_background(
        config: VmConfig,
        done: impl FnOnce(Result<Self, vmm::VmmError>) + Send + 'static,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(format!("start {}", config.name))
            .spawn(move || done(Self::start(config)))
            .map(|_| ())
    }

    /// Builds the VM and starts it.
    pub fn start(config: VmConfig) -> Result<Self, vmm::VmmError> {
        let handle = Arc::new(VmHandle::create(config)?);
        let events = handle.subscribe();
        handle.start()?;
        Ok(Self {
            handle,
            events,
            last_stats: None,
            thumbnail_generation: u64::MAX,
        })
    }

    pub fn state(&self) -> VmState {
        self.handle.state()
    }

    /// Drains events and takes a statistics sample.
    pub fn poll(&mut self) -> Poll {
        let events: Vec<Event> = self.events.try_iter().collect();
        let stats = self.handle.stats();
        let s = self.last_stats.as_ref().and_then(|p| sample(p, &stats));
        self.last_stats = Some(stats.clone());
        Poll {
            state: self.handle.state(),
            events,
            sample: s,
            stats,
        }
    }
}
