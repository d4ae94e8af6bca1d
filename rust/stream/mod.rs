//! XAPI-style VHD streams: produce them (`export`), read them forward-only (`parse`), write
//! their sectors into a target (`apply`), pass them through while validating (`transform`), and resume them at a block (`resume`).

pub mod apply;
pub mod digest;
pub mod export;
pub mod parse;
pub mod report;
pub mod resume;
pub mod throttle;
pub mod transform;

pub use report::StreamReport;
pub use resume::{Cut, Keep, Tally};
