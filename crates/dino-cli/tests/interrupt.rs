//! Interrupted training loses nothing. Killed (SIGKILL) 20 times at random moments, several of
//! them while a checkpoint is being written, and resumed each time, a run ends with exactly the
//! weights and log of a run never killed; Ctrl-C (SIGINT) or SIGTERM finishes the iteration,
//! saves, exits 0 and prints the command that resumes.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use dino_fixtures::sandbox::confined;
use dino_model::weights::read_safetensors;

const EPOCHS: usize = 16;

/// A tiny run on the synthetic data: 4 iterations per epoch, no k-NN, no kept copies. K = 4096
/// makes the checkpoint 17 MB, so that its write takes long enough to be caught.
fn train(run: &Path, epochs: usize) -> Command {
    let mut command = confined(Path::new(env!("CARGO_BIN_EXE_dino")));
    let epochs = epochs.to_string();
    command.args(["train", "--epochs", &epochs, "--max-images", "32", "--batch-size", "8", "--resume"]);
    command.args(["--out-dim", "4096", "--set", "depth=1", "--set", "head_hidden_dim=64", "--set", "knn_every=0"]);
    command.args(["--set", "saveckp_freq=0", "--set", "crops.local_crops=1", "--output", run.to_str().unwrap()]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    let log = std::fs::read_to_string(run.join("log.txt")).unwrap();
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["epoch"].as_u64().unwrap(), v["train_loss"].as_f64().unwrap()))
        .collect()
}

fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (ta, ma) = read_safetensors(&a.join("checkpoint.safetensors")).unwrap();
    let (tb, mb) = read_safetensors(&b.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (key, value) in &ta {
        assert_eq!(value, &tb[key], "{key} differs from the uninterrupted run");
    }
    assert_eq!(ma["epoch"], mb["epoch"]);
}

/// The epoch a complete checkpoint in `run` is at (0 with none yet); panics on a damaged one.
fn checkpoint_epoch(run: &Path) -> usize {
    let path = run.join("checkpoint.safetensors");
    if !path.exists() {
        return 0;
    }
    let (_, metadata) = read_safetensors(&path).unwrap_or_else(|e| panic!("a damaged checkpoint after a kill: {e}"));
    metadata["epoch"].parse().unwrap()
}

#[test]
fn twenty_kills_and_resumes_end_with_the_weights_of_a_run_never_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, killed) = (dir.path().join("straight"), dir.path().join("killed"));
    let started = Instant::now();
    let (ok, _, stderr) = finish(train(&straight, EPOCHS).spawn().unwrap());
    assert!(ok, "{stderr}");
    let whole_run = started.elapsed();

    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut epoch, mut mid_write, mut trail) = (0, 0, Vec::new());
    for kill in 0..20 {
        let spawned = SystemTime::now();
        let mut child = train(&killed, EPOCHS).spawn().unwrap();
        if kill % 3 == 0 {
            // Kill the moment a checkpoint write of this process is under way.
            let tmp = killed.join("checkpoint.safetensors.tmp");
            let deadline = Instant::now() + whole_run * 2;
            while Instant::now() < deadline {
                let fresh = tmp.metadata().ok().and_then(|m| m.modified().ok()).is_some_and(|t| t >= spawned);
                if fresh {
                    mid_write += 1;
                    break;
                }
            }
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Anywhere in the first quarter of a whole run: each restart resumes from the last complete
            // checkpoint, so the kills land all along the run.
            std::thread::sleep(whole_run.mul_f64((rng % 1000) as f64 / 4000.0));
        }
        child.kill().unwrap(); // SIGKILL
        let (_, _, stderr) = finish(child);
        assert!(!stderr.contains("panicked"), "{stderr}");
        let now = checkpoint_epoch(&killed);
        assert!(now >= epoch, "kill {kill}: the checkpoint went back from epoch {epoch} to {now}");
        epoch = now;
        trail.push(now);
    }
    assert!(mid_write >= 1, "no kill landed during a checkpoint write");
    let mid_run = trail.iter().filter(|&&e| e < EPOCHS).count();
    assert!(mid_run >= 5, "kills must land before the run is over: checkpoint epochs {trail:?}");
    let (ok, stdout, stderr) = finish(train(&killed, EPOCHS).spawn().unwrap());
    assert!(ok, "{stdout}\n{stderr}");
    assert_same_checkpoint(&straight, &killed);
    assert_eq!(losses(&killed), losses(&straight), "one log line per epoch, with the uninterrupted losses");
    assert!(!killed.join("checkpoint.safetensors.tmp").exists());
    eprintln!(
        "20 kills ({mid_write} during a checkpoint write) survived, a whole run taking {whole_run:?}; checkpoint epochs after \
         each kill {trail:?}"
    );
}

#[test]
fn sigint_and_sigterm_save_and_exit_zero_with_the_resume_command() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, stopped) = (dir.path().join("straight"), dir.path().join("stopped"));
    let epochs = 12;
    let (ok, _, stderr) = finish(train(&straight, epochs).spawn().unwrap());
    assert!(ok, "{stderr}");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let child = train(&stopped, epochs).spawn().unwrap();
        // Signal once it is training (its first checkpoint exists or this run has started a step).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stopped.join("config.toml").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let (ok, stdout, stderr) = finish(child);
        assert!(ok, "signal {signal}: exit 0 expected\n{stdout}\n{stderr}");
        if stdout.contains("stopped after") {
            assert!(stdout.contains("--resume") && stdout.contains("checkpoint saved"), "{stdout}");
            assert!(stderr.contains("stopping after this iteration"), "{stderr}");
        } else {
            // The run was already finishing when the signal came.
            assert!(stdout.contains("done in"), "{stdout}");
        }
    }
    let (ok, stdout, stderr) = finish(train(&stopped, epochs).spawn().unwrap());
    assert!(ok, "{stdout}\n{stderr}");
    assert_same_checkpoint(&straight, &stopped);
    assert_eq!(losses(&stopped), losses(&straight));
}
