//! xencr's VHD engine: pure format code (`format`), image I/O through chains (`image`),
//! XAPI-style streams (`stream`), coalesce and diff, and the NBD reader (`nbd`). The PyO3 seam
//! lives in `python.rs`, behind the `python` feature, so the engine itself links and tests
//! without libpython.

pub mod coalesce;
pub mod diff;
pub mod error;
pub mod format;
pub mod image;
pub mod nbd;
pub mod net;
pub mod stream;

#[cfg(feature = "python")]
mod python;

pub use error::{Result, VhdError};
