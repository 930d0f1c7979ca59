//! Sample sources: samples replayed from flash, and an LIS3DH on a mock embedded-hal 1.0 bus.
use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, Operation, SevenBitAddress};
use tt_mcu::source::{Accelerometer, SampleSource, SensorError, SliceSource};

#[test]
fn slice_source_replays_in_order_and_counts_epochs() {
    let inputs: Vec<i8> = (0..12).map(|i| i as i8 - 6).collect();
    let labels = [2u8, 0, 1];
    let mut s = SliceSource::new(&inputs, &labels, 4).unwrap();
    let mut x = [0i8; 4];
    for epoch in 0..2 {
        for (i, &l) in labels.iter().enumerate() {
            assert_eq!(s.epoch(), epoch);
            assert_eq!(s.next_sample(&mut x).unwrap(), Some(l as u32));
            assert_eq!(&x[..], &inputs[4 * i..4 * i + 4]);
        }
    }
    assert_eq!(s.epoch(), 2);
    assert!(s.next_sample(&mut [0i8; 3]).is_err());
    assert!(SliceSource::new(&inputs, &labels, 5).is_err());
    assert!(SliceSource::new(&inputs, &[], 4).is_err());
    assert!(SliceSource::new(&inputs, &labels, 0).is_err());
}

/// Register file of an LIS3DH: answers WHO_AM_I, records control writes, reports new data every
/// other status poll, and serves a scripted sequence of (x, y, z) readings.
struct MockLis3dh {
    regs: [u8; 0x40],
    frames: Vec<[i16; 3]>,
    next: usize,
    polls: u32,
    stuck: bool,
}

#[derive(Debug, PartialEq)]
struct Nack;

impl embedded_hal::i2c::Error for Nack {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address)
    }
}

impl ErrorType for MockLis3dh {
    type Error = Nack;
}

impl I2c<SevenBitAddress> for MockLis3dh {
    fn transaction(&mut self, address: u8, operations: &mut [Operation<'_>]) -> Result<(), Nack> {
        if address != 0x18 {
            return Err(Nack);
        }
        let mut sub = 0u8;
        for op in operations {
            match op {
                Operation::Write(w) => {
                    sub = w[0];
                    if w.len() > 1 {
                        self.regs[(sub & 0x7F) as usize] = w[1];
                    }
                }
                Operation::Read(r) => match sub & 0x7F {
                    0x27 => {
                        self.polls += 1;
                        r[0] = if !self.stuck && self.polls.is_multiple_of(2) {
                            0x08
                        } else {
                            0
                        };
                    }
                    0x28 => {
                        assert_eq!(sub & 0x80, 0x80, "multi-byte read without auto-increment");
                        let f = self.frames[self.next];
                        self.next += 1;
                        for (a, v) in f.iter().enumerate() {
                            r[2 * a..2 * a + 2].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    reg => r[0] = self.regs[reg as usize],
                },
            }
        }
        Ok(())
    }
}

fn mock(frames: Vec<[i16; 3]>) -> MockLis3dh {
    let mut regs = [0u8; 0x40];
    regs[0x0F] = 0x33;
    MockLis3dh {
        regs,
        frames,
        next: 0,
        polls: 0,
        stuck: false,
    }
}

#[test]
fn accelerometer_windows_are_quantized_with_saturation_and_labelled() {
    // 1 g = 16384 in the left-justified +-2 g reading; shift 8 gives 64 per g.
    let frames = vec![
        [0, 16384, -16384],
        [127, 128, -129],
        [32767, -32768, 256 * 10],
    ];
    let mut acc = Accelerometer::new(mock(frames), 0x18, 3, 8, -3).unwrap();
    assert_eq!(acc.sample_len(), 9);
    let mut x = [0i8; 9];
    assert_eq!(acc.next_sample(&mut x).unwrap(), None);
    acc.set_label(Some(4));
    let m = acc.release();
    assert_eq!(m.regs[0x20], 0x57, "CTRL_REG1: 100 Hz, x/y/z on");
    assert_eq!(m.regs[0x23], 0x08, "CTRL_REG4: high resolution");
    assert_eq!(m.next, 3);
    // round(v / 256) - 3, clamped to int8
    assert_eq!(x, [-3, 61, -67, -3, -2, -4, 125, -128, 7]);
}

#[test]
fn accelerometer_errors_are_values() {
    let mut wrong = mock(vec![]);
    wrong.regs[0x0F] = 0x44;
    assert!(matches!(
        Accelerometer::new(wrong, 0x18, 1, 8, 0),
        Err(SensorError::WrongDevice { who_am_i: 0x44 })
    ));
    assert!(matches!(
        Accelerometer::new(mock(vec![]), 0x19, 1, 8, 0),
        Err(SensorError::I2c(Nack))
    ));
    let mut acc = Accelerometer::new(mock(vec![[1, 2, 3]]), 0x18, 1, 0, 0).unwrap();
    assert!(matches!(
        acc.next_sample(&mut [0i8; 4]),
        Err(SensorError::WrongLength {
            expected: 3,
            actual: 4
        })
    ));
    let mut m = acc.release();
    m.stuck = true;
    let mut acc = Accelerometer::new(m, 0x18, 1, 0, 0).unwrap();
    assert!(matches!(
        acc.next_sample(&mut [0i8; 3]),
        Err(SensorError::Timeout)
    ));
}
