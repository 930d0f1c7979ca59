//! The names by which tt-core's settings travel outside Rust: a Python user writes
//! `update_precision="stochastic"` or a node's `act="relu6"`, and the binding parses the name here,
//! once, instead of keeping its own table of numeric codes. `name()` is the inverse (a plan's
//! settings reported back by name). Every enum lists its names in `NAMES`, the order of its
//! variants, so a front end can offer them as choices.
use core::fmt;
use core::str::FromStr;

use crate::ir::{LossKind, Precision};
use crate::ops::ChannelAxis;
use crate::quant::{Activation, Rounding};

/// A name that is not one of a setting's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownName {
    /// The setting, e.g. `"update precision"`.
    pub what: &'static str,
    /// Its names.
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} must be one of ", self.what)?;
        for (i, n) in self.expected.iter().enumerate() {
            write!(f, "{}{n:?}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

macro_rules! names {
    ($ty:ty, $what:literal, { $($variant:path => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every name, in the order of the variants.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            pub fn name(self) -> &'static str {
                match self {
                    $($variant => $name),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err(UnknownName {
                        what: $what,
                        expected: <$ty>::NAMES,
                    }),
                }
            }
        }
    };
}

names!(Precision, "update precision", {
    Precision::StochasticRounding => "stochastic",
    Precision::Residual => "residual",
    Precision::FpMaster => "fp32",
});

names!(LossKind, "loss", {
    LossKind::CrossEntropy => "cross_entropy",
    LossKind::Mse => "mse",
});

names!(Rounding, "rounding", {
    Rounding::Single => "single",
    Rounding::Double => "double",
});

names!(Activation, "activation", {
    Activation::None => "none",
    Activation::Relu => "relu",
    Activation::Relu6 => "relu6",
});

names!(ChannelAxis, "channel axis", {
    ChannelAxis::Output => "output",
    ChannelAxis::Input => "input",
});

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: FromStr<Err = UnknownName> + Copy + PartialEq + fmt::Debug>(
        names: &[&str],
        name: impl Fn(T) -> &'static str,
    ) {
        for n in names {
            let v: T = n.parse().unwrap();
            assert_eq!(name(v), *n);
        }
    }

    #[test]
    fn every_name_parses_to_the_variant_that_reports_it() {
        round_trips::<Precision>(Precision::NAMES, Precision::name);
        round_trips::<LossKind>(LossKind::NAMES, LossKind::name);
        round_trips::<Rounding>(Rounding::NAMES, Rounding::name);
        round_trips::<Activation>(Activation::NAMES, Activation::name);
        round_trips::<ChannelAxis>(ChannelAxis::NAMES, ChannelAxis::name);
        assert_eq!(
            "fp32".parse::<Precision>(),
            Ok(Precision::FpMaster),
            "the names are the Python API's"
        );
    }

    #[test]
    fn an_unknown_name_is_refused_naming_the_setting_and_its_names() {
        let e = "Stochastic".parse::<Precision>().unwrap_err();
        assert_eq!(
            std::format!("{e}"),
            r#"update precision must be one of "stochastic", "residual", "fp32""#
        );
        assert!("".parse::<LossKind>().is_err());
    }
}
