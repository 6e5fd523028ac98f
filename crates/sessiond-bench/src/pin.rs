//! Pinning: the servers under test on one core, the load generator on another, so that they
//! do not fight for the same core, the same way in every HTTP scenario.
//!
//! In-process runtimes pin their threads as they start; external server processes are started
//! under `taskset -c`. Where fewer than two cores can be told apart, or `taskset` is missing
//! for a process, everything runs unpinned, and [`describe`] says so.

use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use core_affinity::CoreId;

/// The cores of the servers and of the load generator, if pinning is possible here.
fn plan() -> Option<(CoreId, CoreId)> {
    static PLAN: OnceLock<Option<(CoreId, CoreId)>> = OnceLock::new();
    *PLAN.get_or_init(|| {
        let cores = core_affinity::get_core_ids()?;
        match cores.as_slice() {
            [server, client, ..] => Some((*server, *client)),
            _ => None,
        }
    })
}

/// Set once a thread could not be pinned.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Pins the calling thread to `core`, remembering a failure.
fn pin_to(core: Option<CoreId>) {
    if let Some(c) = core
        && !core_affinity::set_for_current(c)
    {
        FAILED.store(true, Ordering::Relaxed);
    }
}

/// Pins the calling thread to the servers' core (for `on_thread_start` of their runtime).
pub fn server_thread() {
    pin_to(plan().map(|(s, _)| s));
}

/// Pins the calling thread to the load generator's core.
pub fn client_thread() {
    pin_to(plan().map(|(_, c)| c));
}

/// Whether `taskset` (util-linux) can be run.
fn have_taskset() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A command running `program` on the servers' core: under `taskset -c CORE` where pinning
/// is possible, else as it is.
pub fn server_command(program: &std::path::Path) -> Command {
    match plan() {
        Some((server, _)) if have_taskset() => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(server.id.to_string()).arg(program);
            c
        }
        _ => Command::new(program),
    }
}

/// One line on how the servers and the load generator were placed.
pub fn describe() -> String {
    match plan() {
        Some(_) if FAILED.load(Ordering::Relaxed) => {
            "pinning: some threads could not be pinned, so the run is partly unpinned".to_owned()
        }
        Some((s, c)) => format!(
            "pinning: servers on core {} (in-process threads; external peers {}), load \
             generator on core {}",
            s.id,
            if have_taskset() {
                "under taskset"
            } else {
                "UNPINNED: no taskset"
            },
            c.id
        ),
        None => "pinning: unavailable (fewer than two cores seen), the run is unpinned".to_owned(),
    }
}
