//! Servers and tools the tests start as child processes on 127.0.0.1, and the check that
//! what a test needs is installed.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process listening on 127.0.0.1; killed and reaped when dropped, so a failing
/// test leaves no server behind.
pub struct LoopbackServer {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl LoopbackServer {
    /// Spawns `cmd` (its output discarded), which must listen on `port`, and waits up to
    /// `patience` until the port accepts connections.
    pub fn on_port(mut cmd: Command, port: u16, patience: Duration) -> Self {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + patience;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{cmd:?} did not listen on port {port} within {patience:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Spawns a server whose start-up lines on stderr end with its address
    /// (`... http://127.0.0.1:PORT/...`); returns it and the lines printed up to it. The
    /// rest of its stderr is drained so it never blocks.
    // The child is killed and reaped by `Drop` once it is returned.
    #[allow(clippy::zombie_processes)]
    pub fn announced(mut cmd: Command) -> (Self, String) {
        use std::io::BufRead;
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let mut banner = String::new();
        let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                let status = child.wait();
                panic!("{cmd:?} exited ({status:?}): {banner}");
            }
            banner.push_str(&line);
            if let Some(rest) = line.split("http://").nth(1) {
                let addr = rest.split('/').next().unwrap().trim().to_string();
                std::thread::spawn(move || for _ in reader.lines() {});
                let url = format!("http://{addr}");
                return (Self { child, url }, banner);
            }
        }
    }

    /// Stops the server as Ctrl-C would (SIGINT, so it can finish what it records) and
    /// waits for it to exit.
    pub fn interrupt(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server did not stop on SIGINT");
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `what` (a tool or data a test needs) is here. CI installs everything
/// (`.ci/run`), so there a missing piece fails the test; elsewhere the test is skipped
/// with a note saying `how` to get it.
pub fn installed_or_skip(installed: bool, what: &str, how: &str) -> bool {
    if installed {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must provide {what} ({how})"
    );
    eprintln!("skipped: {what} is not here ({how})");
    false
}
