pub mod attention;
pub mod extract;
