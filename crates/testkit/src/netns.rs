//! A network namespace joined to this host by a veth pair, for tests of peers that vanish:
//! run a client inside it, then cut its link so that nothing more gets through and nothing says
//! so (no FIN, no RST, no ICMP), as when a client host loses power. Needs root and `ip` and
//! `iptables`; [`NetNs::unavailable`] says why a test must skip.
//!
//! Each namespace gets its own /30 in 10.128.0.0/9, derived from the test process's pid, so
//! parallel test processes (and other checkouts' tests) never share an address. Dropping it
//! deletes the namespace, which deletes the veth pair; a watchdog does the same if the test
//! process dies first.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

use crate::process::{run, Watchdog};

/// Namespaces created by this process so far: the low two bits of each one's subnet.
static CREATED: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    name: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    _watchdog: Watchdog,
}

/// The program `name` from the usual system directories (tests may run with a narrow PATH).
fn system_program(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

impl NetNs {
    /// Why namespaces cannot be made here, or `None` when they can.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not root: network namespaces need CAP_NET_ADMIN".into());
        }
        for program in ["ip", "iptables"] {
            if system_program(program).is_none() {
                return Some(format!(
                    "no `{program}` program in /usr/sbin, /sbin or /usr/bin"
                ));
            }
        }
        None
    }

    /// A new namespace with its loopback up and a veth link to the host: the host end is
    /// [`NetNs::host_ip`], the namespace end [`NetNs::ns_ip`].
    pub fn create() -> anyhow::Result<NetNs> {
        let ip = system_program("ip").context("no `ip` program")?;
        let pid = std::process::id();
        let n = CREATED.fetch_add(1, Ordering::Relaxed) % 4;
        // Names are at most 15 bytes (IFNAMSIZ - 1); pids here are at most 22 bits.
        let tag = format!("{:x}{n}", pid);
        let name = format!("bwns{tag}");
        let (host_if, ns_if) = (format!("bwh{tag}"), format!("bwn{tag}"));
        // 10.128.0.0/9: 23 bits, 2 per /30 subnet, 2 for `n`, 19 for the pid (pid_max is at most
        // 2^22; a clash needs two live test processes whose pids differ by a multiple of 2^19).
        let subnet = 0x0A80_0000u32 | (((pid & 0x7_FFFF) << 2 | n) << 2);
        let (host_ip, ns_ip) = (Ipv4Addr::from(subnet + 1), Ipv4Addr::from(subnet + 2));

        run(
            Command::new(&ip).args(["netns", "add", &name]),
            "ip netns add",
        )?;
        let watchdog = Watchdog::spawn(
            r#""$1" netns del "$2""#,
            &[ip.as_os_str(), OsStr::new(&name)],
            None,
        );
        let ns = NetNs {
            name: name.clone(),
            host_ip,
            ns_ip,
            _watchdog: match watchdog {
                Ok(w) => w,
                Err(e) => {
                    let _ = Command::new(&ip).args(["netns", "del", &name]).output();
                    return Err(e);
                }
            },
        };
        // From here on, dropping `ns` on an error removes what was made.
        let host_cidr = format!("{host_ip}/30");
        let ns_cidr = format!("{ns_ip}/30");
        let steps: [(&[&str], &str); 6] = [
            (
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
                ],
                "ip link add veth",
            ),
            (
                &["addr", "add", &host_cidr, "dev", &host_if],
                "ip addr add (host)",
            ),
            (&["link", "set", &host_if, "up"], "ip link set up (host)"),
            (
                &["-n", &name, "addr", "add", &ns_cidr, "dev", &ns_if],
                "ip addr add (namespace)",
            ),
            (
                &["-n", &name, "link", "set", &ns_if, "up"],
                "ip link set up (namespace)",
            ),
            (
                &["-n", &name, "link", "set", "lo", "up"],
                "ip link set lo up",
            ),
        ];
        for (args, what) in steps {
            run(Command::new(&ip).args(args), what)?;
        }
        Ok(ns)
    }

    /// This host's address on the link: what a client in the namespace connects to.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace's address: where its clients come from.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(system_program("ip").unwrap_or_else(|| "ip".into()));
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// From now on every packet into or out of the namespace is dropped without a word: the
    /// host sees a peer that has gone silent, as a host that lost power or its network.
    pub fn cut(&self) -> anyhow::Result<()> {
        for chain in ["INPUT", "OUTPUT"] {
            run(
                self.command(system_program("iptables").context("no `iptables` program")?)
                    // -w: wait for the xtables lock, which parallel tests may hold.
                    .args(["-w", "10", "-A", chain, "-j", "DROP"]),
                "iptables -j DROP in the namespace",
            )?;
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Processes still inside keep the namespace's network alive until they exit; the veth
        // pair goes with the namespace either way.
        if let Some(ip) = system_program("ip") {
            let _ = Command::new(ip).args(["netns", "del", &self.name]).output();
        }
    }
}
