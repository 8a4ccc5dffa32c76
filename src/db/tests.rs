//! Tests of the session database through its public handle.
