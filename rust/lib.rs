//! xencr's VHD engine: pure format code, image I/O through chains, XAPI-style streams,
//! coalesce and diff. The PyO3 seam lives in `python.rs`, behind the `python` feature.
