pub mod attention;
pub mod extract;
pub mod train;
