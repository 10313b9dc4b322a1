//! Child processes (etcd, kube-apiserver, backends, the operator) that never outlive the test
//! process: each is spawned with `PR_SET_PDEATHSIG`, from one long-lived thread, because the
//! kernel sends that signal when the *thread* that forked the child exits, and test threads end
//! with their test.

use std::{
    fs::File,
    io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("kubegrpc-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the process spawner thread");
        Mutex::new(requests)
    })
}

/// Spawns `command` so that it is killed (SIGKILL) when this process dies, however it dies.
#[allow(
    unsafe_code,
    reason = "pre_exec and prctl(PR_SET_PDEATHSIG): std has no safe way to tie a child to its parent"
)]
pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() == 1 {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// A named child process whose output goes to a log file; killed when dropped.
pub struct ManagedProcess {
    name: String,
    pid: i32,
    child: Mutex<Option<Child>>,
    log: PathBuf,
}

impl ManagedProcess {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn start(name: impl Into<String>, mut command: Command, log: &Path) -> io::Result<Self> {
        let name = name.into();
        let out = File::options().create(true).append(true).open(log)?;
        command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = spawn_tied(command)
            .map_err(|error| io::Error::new(error.kind(), format!("cannot start {name}: {error}")))?;
        Ok(Self {
            name,
            pid: child.id() as i32,
            child: Mutex::new(Some(child)),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the process's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the process.
    #[allow(unsafe_code, reason = "kill(2): std sends only SIGKILL")]
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        if unsafe { libc::kill(self.pid, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// SIGTERM, then SIGKILL if the process has not exited within `grace`; reaps it.
    #[allow(unsafe_code, reason = "kill(2): std sends only SIGKILL")]
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut child = guard.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // A stopped process does not act on SIGTERM until continued.
        // SAFETY: signals to a child we have not reaped.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
            libc::kill(self.pid, libc::SIGCONT);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut child = guard.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for ManagedProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedProcess")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .finish()
    }
}

/// The last `lines` lines of a file, or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}
