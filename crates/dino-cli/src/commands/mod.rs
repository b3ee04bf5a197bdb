pub mod attention;
pub mod eval;
pub mod extract;
pub mod train;
