//! Where training samples come from. The application owns its sensors and its labels (a button,
//! a second sensor, a host over UART); the trainer only asks a [`SampleSource`] for the next
//! int8 input, quantized as the plan's input tensor expects.
use embedded_hal::i2c::I2c;
use tt_core::Error;

/// A stream of samples for training (with a label) or prediction (without).
pub trait SampleSource {
    type Error;

    /// Int8 elements in one sample: the plan's input size.
    fn sample_len(&self) -> usize;

    /// Fills `input` (exactly [`SampleSource::sample_len`] elements, otherwise an error) with the
    /// next sample and returns its class label, or `None` when the application does not know it.
    fn next_sample(&mut self, input: &mut [i8]) -> Result<Option<u32>, Self::Error>;
}

/// Samples stored back to back in flash (for example the test samples `tinytrain export --mcu`
/// writes), replayed in order, epoch after epoch.
pub struct SliceSource<'a> {
    inputs: &'a [i8],
    labels: &'a [u8],
    sample_len: usize,
    next: usize,
    epoch: u32,
}

impl<'a> SliceSource<'a> {
    /// `inputs` holds `labels.len()` samples of `sample_len` elements each.
    pub fn new(inputs: &'a [i8], labels: &'a [u8], sample_len: usize) -> Result<Self, Error> {
        if sample_len == 0 || labels.is_empty() {
            return Err(Error::InvalidParameter {
                what: "sample source needs a non-zero sample length and at least one sample",
            });
        }
        let expected = labels
            .len()
            .checked_mul(sample_len)
            .ok_or(Error::InvalidParameter {
                what: "sample source size overflows",
            })?;
        if inputs.len() != expected {
            return Err(Error::ShapeMismatch {
                what: "sample inputs (labels x sample length)",
                expected,
                actual: inputs.len(),
            });
        }
        Ok(SliceSource {
            inputs,
            labels,
            sample_len,
            next: 0,
            epoch: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Completed passes over all samples.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Index of the sample the next call returns.
    pub fn position(&self) -> usize {
        self.next
    }

    pub fn rewind(&mut self) {
        self.next = 0;
        self.epoch = 0;
    }
}

impl SampleSource for SliceSource<'_> {
    type Error = Error;

    fn sample_len(&self) -> usize {
        self.sample_len
    }

    fn next_sample(&mut self, input: &mut [i8]) -> Result<Option<u32>, Error> {
        if input.len() != self.sample_len {
            return Err(Error::ShapeMismatch {
                what: "sample buffer",
                expected: self.sample_len,
                actual: input.len(),
            });
        }
        let i = self.next;
        input.copy_from_slice(&self.inputs[i * self.sample_len..(i + 1) * self.sample_len]);
        self.next += 1;
        if self.next == self.labels.len() {
            self.next = 0;
            self.epoch = self.epoch.wrapping_add(1);
        }
        Ok(Some(self.labels[i] as u32))
    }
}

/// Errors of [`Accelerometer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SensorError<E> {
    I2c(E),
    /// WHO_AM_I did not read as an LIS3DH: wrong address, wiring or part.
    WrongDevice {
        who_am_i: u8,
    },
    /// No new data after the poll budget: the sensor stopped or was never started.
    Timeout,
    /// The sample buffer is not a whole number of (x, y, z) frames of the configured window.
    WrongLength {
        expected: usize,
        actual: usize,
    },
}

const WHO_AM_I: u8 = 0x0F;
const LIS3DH_ID: u8 = 0x33;
const CTRL_REG1: u8 = 0x20;
const CTRL_REG4: u8 = 0x23;
const STATUS_REG: u8 = 0x27;
const OUT_X_L: u8 = 0x28;
/// Sub-address bit that makes the LIS3DH auto-increment through a multi-byte read.
const AUTO_INCREMENT: u8 = 0x80;
const ZYXDA: u8 = 0x08;

/// A window of `frames` (x, y, z) readings from an LIS3DH accelerometer on any embedded-hal 1.0
/// I2C bus, as one int8 sample `[x0, y0, z0, x1, ...]`: the left-justified 16-bit reading is
/// shifted right by `shift` and offset by `zero_point` (the plan input's quantization), with
/// saturation. The label is whatever the application set last ([`Accelerometer::set_label`]).
pub struct Accelerometer<I2C> {
    i2c: I2C,
    address: u8,
    frames: usize,
    shift: u8,
    zero_point: i8,
    label: Option<u32>,
    poll_budget: u32,
}

impl<I2C: I2c> Accelerometer<I2C> {
    /// Checks the part and starts it at 100 Hz, all axes, high resolution, +-2 g.
    pub fn new(
        mut i2c: I2C,
        address: u8,
        frames: usize,
        shift: u8,
        zero_point: i8,
    ) -> Result<Self, SensorError<I2C::Error>> {
        let mut id = [0u8];
        i2c.write_read(address, &[WHO_AM_I], &mut id)
            .map_err(SensorError::I2c)?;
        if id[0] != LIS3DH_ID {
            return Err(SensorError::WrongDevice { who_am_i: id[0] });
        }
        i2c.write(address, &[CTRL_REG1, 0x57])
            .map_err(SensorError::I2c)?;
        i2c.write(address, &[CTRL_REG4, 0x08])
            .map_err(SensorError::I2c)?;
        Ok(Accelerometer {
            i2c,
            address,
            frames,
            shift: shift.min(15),
            zero_point,
            label: None,
            poll_budget: 100_000,
        })
    }

    pub fn set_label(&mut self, label: Option<u32>) {
        self.label = label;
    }

    pub fn release(self) -> I2C {
        self.i2c
    }

    fn quantize(&self, lo: u8, hi: u8) -> i8 {
        let raw = i16::from_le_bytes([lo, hi]) as i32;
        // Arithmetic shift with round-half-up keeps the mapping monotonic and symmetric enough
        // for a sensor whose noise floor is far above one LSB of the int8 input.
        let q = if self.shift == 0 {
            raw
        } else {
            (raw + (1 << (self.shift - 1))) >> self.shift
        };
        (q + self.zero_point as i32).clamp(-128, 127) as i8
    }
}

impl<I2C: I2c> SampleSource for Accelerometer<I2C> {
    type Error = SensorError<I2C::Error>;

    fn sample_len(&self) -> usize {
        3 * self.frames
    }

    fn next_sample(&mut self, input: &mut [i8]) -> Result<Option<u32>, Self::Error> {
        if input.len() != self.sample_len() {
            return Err(SensorError::WrongLength {
                expected: self.sample_len(),
                actual: input.len(),
            });
        }
        for frame in input.chunks_exact_mut(3) {
            let mut polls = 0;
            loop {
                let mut status = [0u8];
                self.i2c
                    .write_read(self.address, &[STATUS_REG], &mut status)
                    .map_err(SensorError::I2c)?;
                if status[0] & ZYXDA != 0 {
                    break;
                }
                polls += 1;
                if polls >= self.poll_budget {
                    return Err(SensorError::Timeout);
                }
            }
            let mut raw = [0u8; 6];
            self.i2c
                .write_read(self.address, &[OUT_X_L | AUTO_INCREMENT], &mut raw)
                .map_err(SensorError::I2c)?;
            for (axis, out) in frame.iter_mut().enumerate() {
                *out = self.quantize(raw[2 * axis], raw[2 * axis + 1]);
            }
        }
        Ok(self.label)
    }
}
