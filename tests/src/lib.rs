//! Test support for the cronpipe integration suite.
