//! QEMU's ISA debug console (`isa-debugcon`), port 0x402, one byte wide.
//!
//! Emulated: every byte written (whatever the access width) goes to the output writer,
//! flushed after each access; every byte read returns 0xe9, QEMU's readback value that
//! SeaBIOS (and OVMF) check to detect the port. Writer errors are counted, never fatal.
//! Not emulated: input (the port is output only), a configurable readback value.

use std::io::Write;

use crate::bus::BusDevice;

/// Port of the debug console on a QEMU-compatible PC.
pub const DEBUGCON_PORT: u64 = 0x402;
/// What a read of the port returns.
pub const DEBUGCON_READBACK: u8 = 0xe9;

/// The debug console device; register it for one port.
pub struct DebugCon {
    out: Box<dyn Write + Send>,
    bytes_written: u64,
    output_errors: u64,
}

impl DebugCon {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            bytes_written: 0,
            output_errors: 0,
        }
    }

    /// Bytes that reached the writer.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Write accesses whose bytes were lost because the writer failed.
    pub fn output_errors(&self) -> u64 {
        self.output_errors
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(DEBUGCON_READBACK);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self.out.write_all(data).and_then(|()| self.out.flush()) {
            Ok(()) => self.bytes_written += data.len() as u64,
            Err(e) => {
                if self.output_errors == 0 {
                    log::warn!("debugcon: output failed, dropping guest output: {e}");
                }
                self.output_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    use crate::test_support::SharedBuffer;

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn seabios_detects_the_port_and_prints_through_it() {
        let out = SharedBuffer::default();
        let mut dev = DebugCon::new(Box::new(out.clone()));
        // SeaBIOS: if (inb(0x402) == 0xe9) use the port for debug output.
        let mut probe = [0u8];
        dev.read(0, &mut probe);
        assert_eq!(probe[0], DEBUGCON_READBACK);
        for &b in b"SeaBIOS (version 1.16)\n" {
            dev.write(0, &[b]);
        }
        assert_eq!(out.contents(), b"SeaBIOS (version 1.16)\n");
        assert_eq!(dev.bytes_written(), 23);
    }

    #[test]
    fn wide_accesses_output_all_bytes_and_read_back_e9() {
        let out = SharedBuffer::default();
        let mut dev = DebugCon::new(Box::new(out.clone()));
        dev.write(0, b"ab");
        dev.write(0, b"cdef");
        dev.write(0, &[]);
        assert_eq!(out.contents(), b"abcdef");
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xe9; 4]);
    }

    #[test]
    fn failing_writer_is_counted_not_fatal() {
        let mut dev = DebugCon::new(Box::new(Failing));
        for i in 0..50u8 {
            dev.write(0, &[i]);
        }
        assert_eq!(dev.output_errors(), 50);
        assert_eq!(dev.bytes_written(), 0);
    }

    #[test]
    fn hostile_traffic_never_panics() {
        let out = SharedBuffer::default();
        let mut dev = DebugCon::new(Box::new(out.clone()));
        let mut seed: u32 = 0x1234_5678;
        let mut total = 0usize;
        for _ in 0..10_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let len = (seed % 5) as usize;
            let offset = u64::from(seed >> 8);
            let bytes = seed.to_le_bytes();
            if seed & 0x100 == 0 {
                dev.write(offset, &bytes[..len.min(4)]);
                total += len.min(4);
            } else {
                let mut buf = [0u8; 4];
                dev.read(offset, &mut buf[..len.min(4)]);
                assert!(buf[..len.min(4)].iter().all(|&b| b == DEBUGCON_READBACK));
            }
        }
        assert_eq!(out.contents().len(), total);
    }
}
