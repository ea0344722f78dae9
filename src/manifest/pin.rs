//! `preseed pin`: writes resolved digests into `bundles.toml` in place,
//! keeping comments and layout (toml_edit).
