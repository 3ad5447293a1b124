//! The worker side: everything that touches the model.
pub mod generate;
