//! Fetching blobs from registries into the content-addressed cache.

pub mod cache;
