//! What a hostile guest driver does, as a byte string the fuzzer mutates:
//! a sequence of steps, each a tag byte and its operands. The tag's low two
//! bits say which step; its high six bits are the step's small argument.
//! Truncated operands are taken as they are, so every input means
//! something. [`Script`] writes the same format, for the seed corpus.

/// One step of the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Bytes written into guest memory at `address` (descriptors, rings,
    /// buffers: the driver owns all of it).
    Write { address: u16, bytes: &'a [u8] },
    /// A notification of queue `queue`.
    Kick { queue: u8 },
    /// Something the device's host side does (a frame from the tap, a
    /// host connection); what `action` means is the target's business.
    Host { action: u8, bytes: &'a [u8] },
    /// A 32-bit write of the transport register at `offset`.
    Register { offset: u16, value: u32 },
}

const WRITE: u8 = 0;
const KICK: u8 = 1;
const HOST: u8 = 2;
const REGISTER: u8 = 3;

/// The steps of `input`, in order.
pub fn steps(input: &[u8]) -> Steps<'_> {
    Steps { rest: input }
}

pub struct Steps<'a> {
    rest: &'a [u8],
}

impl<'a> Steps<'a> {
    fn take(&mut self, len: usize) -> &'a [u8] {
        let (taken, rest) = self.rest.split_at(len.min(self.rest.len()));
        self.rest = rest;
        taken
    }

    fn u16(&mut self) -> u16 {
        let mut bytes = [0; 2];
        let taken = self.take(2);
        bytes[..taken.len()].copy_from_slice(taken);
        u16::from_le_bytes(bytes)
    }

    fn u32(&mut self) -> u32 {
        let mut bytes = [0; 4];
        let taken = self.take(4);
        bytes[..taken.len()].copy_from_slice(taken);
        u32::from_le_bytes(bytes)
    }

    /// A length byte and that many bytes.
    fn counted(&mut self) -> &'a [u8] {
        let len = self.take(1).first().copied().unwrap_or(0);
        self.take(usize::from(len))
    }
}

impl<'a> Iterator for Steps<'a> {
    type Item = Step<'a>;

    fn next(&mut self) -> Option<Step<'a>> {
        let tag = *self.take(1).first()?;
        let argument = tag >> 2;
        Some(match tag & 3 {
            WRITE => Step::Write {
                address: self.u16(),
                bytes: self.counted(),
            },
            KICK => Step::Kick { queue: argument },
            HOST => Step::Host {
                action: argument,
                bytes: self.counted(),
            },
            _ => Step::Register {
                offset: self.u16(),
                value: self.u32(),
            },
        })
    }
}

/// Builds an input step by step, for seeds.
#[derive(Default)]
pub struct Script {
    bytes: Vec<u8>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// Writes `bytes` at `address`, in as many steps as they need.
    pub fn write(mut self, address: u16, bytes: &[u8]) -> Script {
        for (index, chunk) in bytes.chunks(usize::from(u8::MAX)).enumerate() {
            let at = usize::from(address) + index * usize::from(u8::MAX);
            self.bytes.push(WRITE);
            self.bytes
                .extend_from_slice(&u16::try_from(at).expect("within 64 KiB").to_le_bytes());
            self.bytes.push(chunk.len() as u8);
            self.bytes.extend_from_slice(chunk);
        }
        self
    }

    pub fn kick(mut self, queue: u8) -> Script {
        self.bytes.push(queue << 2 | KICK);
        self
    }

    /// A host action with `bytes` (at most 255 of them).
    pub fn host(mut self, action: u8, bytes: &[u8]) -> Script {
        let len = u8::try_from(bytes.len()).expect("at most 255 bytes per host step");
        self.bytes.push(action << 2 | HOST);
        self.bytes.push(len);
        self.bytes.extend_from_slice(bytes);
        self
    }

    pub fn register(mut self, offset: u16, value: u32) -> Script {
        self.bytes.push(REGISTER);
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_reads_back_as_its_steps() {
        let long = vec![7u8; 300];
        let bytes = Script::new()
            .write(0x1000, &long)
            .kick(2)
            .host(5, b"frame")
            .register(0x70, 0xf)
            .into_bytes();
        let read: Vec<Step> = steps(&bytes).collect();
        assert_eq!(
            read,
            vec![
                Step::Write {
                    address: 0x1000,
                    bytes: &long[..255]
                },
                Step::Write {
                    address: 0x10ff,
                    bytes: &long[255..]
                },
                Step::Kick { queue: 2 },
                Step::Host {
                    action: 5,
                    bytes: b"frame"
                },
                Step::Register {
                    offset: 0x70,
                    value: 0xf
                },
            ]
        );
    }

    #[test]
    fn truncated_operands_still_make_a_step() {
        let read: Vec<Step> = steps(&[REGISTER, 0x70]).collect();
        assert_eq!(
            read,
            vec![Step::Register {
                offset: 0x70,
                value: 0
            }]
        );
    }
}
