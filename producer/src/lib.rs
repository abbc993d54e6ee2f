//! cronpipe producer library.
