//! Integration tests of the embedded log through its public interface.

mod basics;
mod compaction;
mod durability;
mod recovery;
mod support;
