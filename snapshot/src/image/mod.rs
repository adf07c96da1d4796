//! The image: what it holds ([`model`]) and how it is laid out on disk
//! ([`format`]).

pub mod format;
pub mod model;

pub use format::{open_file, Durability, Image, ImageWriter, PAGE};
pub use model::*;
