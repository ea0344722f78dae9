//! A real containerd (with runc) started by a test in a temp dir.
