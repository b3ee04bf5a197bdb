pub mod attention;
pub mod bench;
pub mod eval;
pub mod extract;
pub mod finetune;
pub mod retrieve;
pub mod train;
