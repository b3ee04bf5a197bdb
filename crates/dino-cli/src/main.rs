//! `dino`: self-supervised Vision Transformers (DINO) from the command line.
//!
//! The binary only parses arguments and glues the library crates together.

mod commands;
mod device;
mod images;
mod load;

use std::process::ExitCode;

/// Large blocks on cache lines, so that the AMX kernels store tiles straight into the tensors
/// they write (`cpu_bf16::CacheLineAligned`).
#[global_allocator]
static ALLOCATOR: dino_kernels::cpu_bf16::CacheLineAligned = dino_kernels::cpu_bf16::CacheLineAligned;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dino",
    version,
    about = "DINO self-supervised Vision Transformers: train, extract features, inspect attention"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain a ViT with DINO on unlabeled images.
    // `--lr -1` is a value (refused by the range check, naming it), not an unknown flag.
    #[command(allow_negative_numbers = true)]
    Train(Box<commands::train::TrainArgs>),
    /// Extract one feature vector per image with a trained backbone.
    Extract(commands::extract::ExtractArgs),
    /// Index a collection of images and list each query image's nearest neighbours.
    Retrieve(commands::retrieve::RetrieveArgs),
    /// Draw the last block's per-head self-attention maps for an image.
    Attention(commands::attention::AttentionArgs),
    /// Evaluate frozen features: k-NN, linear probe, embedding picture, retrieval, copy detection.
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Fine-tune a backbone with a linear head on labeled images (DeiT-style, simplified).
    #[command(allow_negative_numbers = true)]
    Finetune(Box<commands::finetune::FinetuneArgs>),
    /// Time the training step, inference and augmentation (compare with torch_reference.py).
    Bench(commands::bench::BenchArgs),
}

/// Training allocates and frees the same large activation buffers every step. glibc's malloc
/// serves them with mmap and unmaps them on free, so each step page-faults freshly zeroed memory
/// (a quarter of the time was kernel time). Keeping freed memory in the heap removes that
/// (BENCHMARKS.md). glibc rejects an mmap threshold above 32 MiB, so mmap is switched off
/// instead (`M_MMAP_MAX` = 0) and the heap is never trimmed.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        let no_mmap = libc::mallopt(libc::M_MMAP_MAX, 0);
        let no_trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        debug_assert!(no_mmap == 1 && no_trim == 1, "glibc refused a malloc tunable");
    }
}

/// Restores the default SIGPIPE action, which Rust's runtime ignores: `dino ... | head` then
/// ends quietly when `head` closes the pipe, as other command-line tools do, instead of
/// panicking on the next print.
fn quiet_on_closed_pipe() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: resets one signal's disposition to the default, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    quiet_on_closed_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            // clap's message, its first paragraph on one line like every other error: "error:
            // invalid value '-1' for '--epochs <EPOCHS>': invalid digit found in string; see
            // --help", or "error: the following required arguments were not provided: --image
            // <FILE>|--frames <DIR|FILE>; see --help".
            let message = err.to_string();
            let first: Vec<&str> = message.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            let first = first.join(" ");
            eprintln!("error: {}; see --help", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Train(args) => commands::train::run(*args),
        Command::Extract(args) => commands::extract::run(args),
        Command::Retrieve(args) => commands::retrieve::run(args),
        Command::Attention(args) => commands::attention::run(args),
        Command::Eval(command) => commands::eval::run(command),
        Command::Finetune(args) => commands::finetune::run(*args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Library errors often print their source already
/// (`{path}: {source}`), so a cause whose text the line holds is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1).map(|c| c.to_string()) {
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}
