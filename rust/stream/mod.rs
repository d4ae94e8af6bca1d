//! XAPI-style VHD streams: produce them (`export`), read them forward-only (`parse`), write
//! their sectors into a target (`apply`), and pass them through while validating (`transform`).

pub mod apply;
pub mod digest;
pub mod export;
pub mod parse;
pub mod report;
pub mod throttle;
pub mod transform;

pub use report::StreamReport;
