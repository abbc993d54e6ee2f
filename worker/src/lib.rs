//! cronpipe worker library.
