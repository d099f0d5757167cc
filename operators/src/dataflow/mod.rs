//! Timely operators wrapping each stage (the only timely-facing code).
