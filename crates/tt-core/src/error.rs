//! One error type for the whole core. Every variant names what was wrong and where, so a
//! caller can print it as it is; nothing in the core panics on external data.
use core::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A buffer or dimension does not have the size the operation needs.
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// A parameter is out of its valid range (zero stride, groups not dividing channels, ...).
    InvalidParameter { what: &'static str },
    /// A value could not be represented (a scale that is zero, negative or not finite, ...).
    NotRepresentable { what: &'static str },
    /// A NaN or infinity where a finite number is required (a diverged gradient, ...).
    NonFinite { what: &'static str },
    /// A plan's bytes are truncated, corrupted or inconsistent; `field` names what failed.
    CorruptPlan { field: &'static str },
    /// A buffer (the arena, a parameter blob) is smaller than the plan needs.
    OutOfMemory {
        what: &'static str,
        needed: usize,
        available: usize,
    },
    /// An update blob is truncated, corrupted or does not match its plan's trained parameters;
    /// `field` names what failed.
    CorruptUpdate { field: &'static str },
    /// An update blob was written for another plan: its plan tag is not this plan's.
    UpdatePlanMismatch { expected: u32, found: u32 },
}

pub type Result<T> = core::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch {
                what,
                expected,
                actual,
            } => {
                write!(f, "{what}: expected {expected} elements, got {actual}")
            }
            Error::InvalidParameter { what } => write!(f, "invalid parameter: {what}"),
            Error::NotRepresentable { what } => write!(f, "not representable: {what}"),
            Error::NonFinite { what } => write!(f, "non-finite value (NaN or inf): {what}"),
            Error::CorruptPlan { field } => write!(f, "corrupted or truncated plan: field {field}"),
            Error::OutOfMemory {
                what,
                needed,
                available,
            } => write!(f, "{what}: needs {needed} bytes, {available} available"),
            Error::CorruptUpdate { field } => {
                write!(f, "corrupted or truncated update blob: field {field}")
            }
            Error::UpdatePlanMismatch { expected, found } => write!(
                f,
                "update blob written for another plan (plan tag {found:08x}, this plan's is {expected:08x})"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
