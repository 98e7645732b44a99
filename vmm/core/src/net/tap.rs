//! TAP backend: the card's frames go to an existing Linux TAP device (`/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI`), and frames the host sends on it come to the card.
//!
//! Emulated: plain Ethernet frames in both directions, non-blocking, read in batches.
//! Not here: creating or configuring the device (that needs root: `ip tuntap add mode tap
//! user $USER name tap0`), the virtio-net header (`IFF_VNET_HDR`) and offloads (the cards
//! already resolve checksums and segmentation), multiqueue. A frame the device refuses
//! (interface down, queue full) is dropped and counted.

use std::ffi::{c_short, CString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, Wire};

const TUN_PATH: &str = "/dev/net/tun";
/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TUN: c_short = 0x0001;
const IFF_TAP: c_short = 0x0002;
const IFF_NO_PI: c_short = 0x1000;
/// Frames read per wakeup before the loop looks at the guest's side again.
const MAX_READS_PER_POLL: usize = 64;
/// Largest frame read from the device (jumbo frames and offloaded super-frames included).
const READ_BUFFER_LEN: usize = 65536 + 256;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the rest of the union).
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: c_short,
    _rest: [u8; 22],
}

fn check_name(name: &str) -> Result<CString, NetError> {
    let bad = |reason: &str| NetError::TapName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(bad("interface names have at most 15 bytes"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            "interface names contain no '/', ':', spaces or control characters",
        ));
    }
    if name == "." || name == ".." {
        return Err(bad("not an interface name"));
    }
    CString::new(name).map_err(|_| bad("contains a NUL character"))
}

/// What an errno of TUNSETIFF on an existing device means to the user.
fn attach_error(name: &str, error: std::io::Error) -> NetError {
    let name = name.to_string();
    match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => NetError::TapPermission { name },
        Some(libc::EBUSY) => NetError::TapBusy { name },
        Some(libc::EINVAL) => NetError::NotATap { name },
        _ => NetError::Tap {
            name,
            source: error,
        },
    }
}

/// An attached TAP device.
pub(super) struct TapWire {
    file: File,
    name: String,
    buffer: Vec<u8>,
    errors: u64,
    /// Index of the device's entry in the poll set, from the last `prepare`.
    poll_index: Option<usize>,
    read_error_logged: bool,
}

impl TapWire {
    /// Attaches to the existing TAP device `name` (never creates one).
    pub(super) fn open(name: &str) -> Result<TapWire, NetError> {
        let c_name = check_name(name)?;
        // SAFETY: c_name is a valid NUL-terminated string for the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(NetError::NoSuchTap {
                name: name.to_string(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => NetError::TapPermission {
                    name: name.to_string(),
                },
                _ => NetError::TunUnavailable { source },
            })?;
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _rest: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and may write back) one `struct ifreq`, which
        // InterfaceRequest matches in layout and size (40 bytes); the fd is ours.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if result < 0 {
            return Err(attach_error(name, std::io::Error::last_os_error()));
        }
        let mut attached = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _rest: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into our matching buffer.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut attached) };
        if result < 0 {
            return Err(NetError::Tap {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        if attached.flags & IFF_TUN != 0 || attached.flags & IFF_TAP == 0 {
            return Err(NetError::NotATap {
                name: name.to_string(),
            });
        }
        Ok(TapWire {
            file,
            name: name.to_string(),
            buffer: vec![0; READ_BUFFER_LEN],
            errors: 0,
            poll_index: None,
            read_error_logged: false,
        })
    }

    fn read_frames(&mut self, to_guest: &mut Vec<Vec<u8>>) {
        for _ in 0..MAX_READS_PER_POLL {
            match self.file.read(&mut self.buffer) {
                Ok(0) => break,
                Ok(len) => {
                    if let Some(frame) = self.buffer.get(..len) {
                        to_guest.push(frame.to_vec());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.read_error_logged {
                        log::warn!("TAP device {}: read failed: {e}", self.name);
                        self.read_error_logged = true;
                    }
                    break;
                }
            }
        }
    }
}

impl Wire for TapWire {
    fn transmit(&mut self, frame: &[u8], _to_guest: &mut Vec<Vec<u8>>) {
        match self.file.write(frame) {
            Ok(written) if written == frame.len() => {}
            Ok(_) | Err(_) => self.errors += 1,
        }
    }

    fn prepare(&mut self, fds: &mut Vec<libc::pollfd>, _timeout_ms: &mut u64) {
        self.poll_index = Some(fds.len());
        fds.push(libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }

    fn dispatch(&mut self, fds: &[libc::pollfd], poll_failed: bool, to_guest: &mut Vec<Vec<u8>>) {
        let readable = self
            .poll_index
            .and_then(|i| fds.get(i))
            .is_some_and(|entry| entry.revents & libc::POLLIN != 0);
        if readable && !poll_failed {
            self.read_frames(to_guest);
        }
    }

    fn take_errors(&mut self) -> u64 {
        std::mem::take(&mut self.errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tests::FakeCard;
    use crate::net::NetBackend;
    use std::sync::{Arc, Mutex};

    #[test]
    fn bad_names_are_refused_before_touching_the_system() {
        for name in ["", "a-name-that-is-too-long", "a/b", "tap 0", "..", "a\0b"] {
            assert!(
                matches!(TapWire::open(name), Err(NetError::TapName { .. })),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_missing_device_says_how_to_create_one() {
        let error = TapWire::open("deskvmnone9").err().unwrap();
        assert!(matches!(error, NetError::NoSuchTap { .. }));
        let message = error.to_string();
        assert!(message.contains("ip tuntap add mode tap user"), "{message}");
        assert!(message.contains("deskvmnone9"), "{message}");
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_refused() {
        // The loopback interface exists in every network namespace.
        match TapWire::open("lo") {
            Err(NetError::NotATap { name }) => assert_eq!(name, "lo"),
            // Unprivileged and without /dev/net/tun access: also a clear refusal.
            Err(NetError::TapPermission { .. }) | Err(NetError::TunUnavailable { .. }) => {}
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("lo accepted as a TAP device"),
        }
    }

    #[test]
    fn attach_errors_explain_what_to_do() {
        let permission = attach_error("tap0", std::io::Error::from_raw_os_error(libc::EPERM));
        assert!(matches!(permission, NetError::TapPermission { .. }));
        let message = permission.to_string();
        assert!(message.contains("owned by your user"), "{message}");
        assert!(message.contains("ip tuntap add mode tap user $USER name tap0"));
        assert!(matches!(
            attach_error("tap0", std::io::Error::from_raw_os_error(libc::EBUSY)),
            NetError::TapBusy { .. }
        ));
        assert!(matches!(
            attach_error("tap0", std::io::Error::from_raw_os_error(libc::EINVAL)),
            NetError::NotATap { .. }
        ));
        assert!(matches!(
            attach_error("tap0", std::io::Error::from_raw_os_error(libc::EIO)),
            NetError::Tap { .. }
        ));
    }

    /// Creates a persistent TAP device and brings it up (needs CAP_NET_ADMIN in the
    /// current network namespace).
    fn create_tap(name: &str) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)?;
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _rest: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: test-only ioctls on our own fd with matching `struct ifreq` buffers.
        unsafe {
            if libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // TUNSETPERSIST
            if libc::ioctl(file.as_raw_fd(), 0x4004_54cb, 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        drop(file);
        // SAFETY: plain socket for SIOC[GS]IFFLAGS; closed below.
        let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if socket < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.flags = 0;
        // SAFETY: ifreq-sized buffer for both ioctls; the socket is ours.
        let result = unsafe {
            if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) < 0 {
                -1
            } else {
                request.flags |= libc::IFF_UP as c_short;
                libc::ioctl(socket, libc::SIOCSIFFLAGS, &mut request)
            }
        };
        let error = std::io::Error::last_os_error();
        // SAFETY: closing our own socket.
        unsafe { libc::close(socket) };
        if result < 0 {
            return Err(error);
        }
        Ok(())
    }

    /// An AF_PACKET socket on the interface: the host side of the TAP device.
    struct HostSide {
        fd: libc::c_int,
        ifindex: libc::c_int,
    }

    impl HostSide {
        fn open(name: &str) -> std::io::Result<Self> {
            let c_name = CString::new(name).unwrap();
            // SAFETY: valid C string.
            let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) } as libc::c_int;
            let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
            // SAFETY: plain socket creation.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: zeroed sockaddr_ll is valid; bind reads sizeof(sockaddr_ll) bytes.
            let result = unsafe {
                let mut address: libc::sockaddr_ll = std::mem::zeroed();
                address.sll_family = libc::AF_PACKET as u16;
                address.sll_protocol = protocol as u16;
                address.sll_ifindex = ifindex;
                libc::bind(
                    fd,
                    &address as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if result < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: SO_RCVTIMEO takes a timeval.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &timeout as *const libc::timeval as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            Ok(Self { fd, ifindex })
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: zeroed sockaddr_ll is valid; the frame is readable for its length.
            let sent = unsafe {
                let mut address: libc::sockaddr_ll = std::mem::zeroed();
                address.sll_family = libc::AF_PACKET as u16;
                address.sll_ifindex = self.ifindex;
                address.sll_halen = 6;
                address.sll_addr[..6].copy_from_slice(&frame[..6]);
                libc::sendto(
                    self.fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &address as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(
                sent,
                frame.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
        }

        fn receive(&self) -> Option<Vec<u8>> {
            let mut buffer = vec![0u8; 2048];
            // SAFETY: the buffer is writable for its length.
            let len = unsafe {
                libc::recv(
                    self.fd,
                    buffer.as_mut_ptr() as *mut libc::c_void,
                    buffer.len(),
                    0,
                )
            };
            if len <= 0 {
                return None;
            }
            buffer.truncate(len as usize);
            Some(buffer)
        }
    }

    impl Drop for HostSide {
        fn drop(&mut self) {
            // SAFETY: closing our own socket.
            unsafe { libc::close(self.fd) };
        }
    }

    /// Local experimental EtherType, so the kernel's own frames (IPv6 router
    /// solicitations...) are told apart.
    const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    fn test_frame(dst: [u8; 6], src: [u8; 6], text: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&TEST_ETHERTYPE);
        frame.extend_from_slice(text);
        frame.resize(60, 0);
        frame
    }

    /// In a private network namespace (needs root or a user namespace allowing it): a TAP
    /// device carries frames both ways between the card and the host's stack.
    #[test]
    fn frames_cross_a_tap_device_in_a_private_network_namespace() {
        let outcome = std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace; threads it
            // spawns inherit it, other test threads are unaffected.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "no private network namespace: {}",
                    std::io::Error::last_os_error()
                ));
            }
            create_tap("dvmtap0").map_err(|e| format!("cannot create a TAP device: {e}"))?;
            let host = HostSide::open("dvmtap0").map_err(|e| format!("no packet socket: {e}"))?;
            let (sink, port) = NetBackend::channel().unwrap();
            let card = Arc::new(Mutex::new(FakeCard::new(100)));
            let backend = NetBackend::start_tap(3, "dvmtap0", card.clone(), port).unwrap();
            // A second attachment to the same (single-queue) device is refused as busy.
            let (_, port2) = NetBackend::channel().unwrap();
            let second = NetBackend::start_tap(4, "dvmtap0", card.clone(), port2);
            assert!(
                matches!(second, Err(NetError::TapBusy { .. })),
                "{:?}",
                second.err()
            );

            let guest_mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
            let to_host = test_frame([0xff; 6], guest_mac, b"from the guest");
            sink.send(&to_host);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "frame never reached the host"
                );
                if let Some(frame) = host.receive() {
                    if frame.get(12..14) == Some(&TEST_ETHERTYPE[..]) {
                        assert_eq!(frame, to_host);
                        break;
                    }
                }
            }
            let to_guest = test_frame(guest_mac, [2, 0, 0, 0, 0, 9], b"from the host");
            // Sent again every 100 ms: the kernel may drop a frame sent while the
            // device's queue is still being set up (seen once under heavy load).
            let mut next_send = std::time::Instant::now();
            loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "frame never reached the card"
                );
                if std::time::Instant::now() >= next_send {
                    host.send(&to_guest);
                    next_send += std::time::Duration::from_millis(100);
                }
                let received = card.lock().unwrap().received.clone();
                if received.contains(&to_guest) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(backend.stats().from_guest >= 1);
            assert!(backend.stats().to_guest >= 1);
            Ok(())
        })
        .join()
        .unwrap();
        if let Err(reason) = outcome {
            // Sandboxes without CAP_SYS_ADMIN/CAP_NET_ADMIN cannot run this exchange.
            eprintln!("skipped the TAP frame exchange: {reason}");
        }
    }
}
