//! What each PgBouncer setting becomes in Breakwater: the same key, another key, nothing
//! (Breakwater already behaves that way), or no equivalent and why. One table serves the config
//! reader (a PgBouncer key in pooler.toml gets a specific answer instead of "unknown key") and
//! `breakwater import-pgbouncer`. Nothing here reads a file.

/// How a PgBouncer value is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Text, kept as a string.
    Text,
    /// A whole number.
    Int,
    /// Seconds without a unit (PgBouncer's default for durations).
    Secs,
    /// Milliseconds without a unit (`tcp_user_timeout`).
    Millis,
    /// `0`/`1` (also on/off, yes/no, true/false).
    Bool,
    /// A comma-separated list.
    List,
}

/// What a `[pgbouncer]` key becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The `[pooler]` key of the same name means the same.
    Same(Unit),
    /// The same name, with a difference worth knowing.
    Differs(Unit, &'static str),
    /// Breakwater already does what this asks (or needs no such knob); accepted with a warning.
    NoOp(&'static str),
    /// No equivalent yet.
    Unsupported(&'static str),
}

use Fate::*;
use Unit::*;

const REPLACED_BY_LOGS: &str =
    "Breakwater logs to stdout/stderr (text or JSON, log_format): let systemd, the container runtime or a shell redirect keep the log";

/// Every `[pgbouncer]` key of PgBouncer 1.25, in the order of its documentation.
pub const KEYS: &[(&str, Fate)] = &[
    ("logfile", Unsupported(REPLACED_BY_LOGS)),
    ("pidfile", Unsupported("Breakwater runs in the foreground; the service manager keeps its pid")),
    ("listen_addr", Differs(Text, "\"*\" and comma lists work; a host name listens on each of its addresses")),
    ("listen_port", Same(Int)),
    ("unix_socket_dir", Differs(Text, "PgBouncer listens on /tmp unless told otherwise; Breakwater opens no Unix socket unless this is set")),
    ("unix_socket_mode", Unsupported("the socket gets the process umask")),
    ("unix_socket_group", Unsupported("the socket gets the process's group")),
    ("user", Unsupported("Breakwater does not switch users: start it as the user it should run as")),
    ("pool_mode", Same(Text)),
    ("max_client_conn", Same(Int)),
    ("default_pool_size", Same(Int)),
    ("min_pool_size", Same(Int)),
    ("reserve_pool_size", Differs(Int, "the extra connections go back (closed) once idle with nobody waiting, sooner than server_idle_timeout")),
    ("reserve_pool_timeout", Same(Secs)),
    ("max_db_connections", Differs(Int, "per database only: the importer writes it into each [databases] entry; max_server_connections caps all pools together")),
    ("max_db_client_connections", Same(Int)),
    ("max_user_connections", Differs(Int, "clients wait for a connection of the user's to close; Breakwater does not close the user's idle connections in other pools to make room")),
    ("max_user_client_connections", Same(Int)),
    ("server_round_robin", Unsupported("a pool reuses its most recently released server; use load_balance_hosts for hosts")),
    ("track_extra_parameters", NoOp("every startup parameter and every parameter PostgreSQL reports that a client may set (IntervalStyle and search_path too) already follows the client from server to server")),
    ("ignore_startup_parameters", NoOp("Breakwater forwards every startup parameter to the server, so none needs ignoring")),
    ("peer_id", Unsupported("no peering: use one Breakwater per host, with all cores (workers)")),
    ("disable_pqexec", Unsupported("multi-statement simple queries cannot be refused")),
    ("application_name_add_host", Unsupported("application_name is passed through unchanged")),
    ("conffile", NoOp("SHOW CONFIG shows the file it was started with")),
    ("service_name", NoOp("Windows service names do not apply")),
    ("job_name", NoOp("Windows service names do not apply")),
    ("stats_period", Same(Secs)),
    ("max_prepared_statements", Differs(Int, "named statements are kept per server connection (LRU); 0 passes names through")),
    ("scram_iterations", NoOp("SCRAM verifiers made from plaintext auth_file passwords use 4096 iterations")),
    ("auth_type", Differs(Text, "trust, md5, scram-sha-256 and cert work; plain, any, hba, pam and ldap do not")),
    ("auth_hba_file", Unsupported("no pg_hba.conf-style rules: use client_tls_sslmode and auth_type")),
    ("auth_ident_file", Unsupported("no ident maps")),
    ("auth_file", Differs(Text, "the same format; a relative path is relative to pooler.toml")),
    ("auth_user", Same(Text)),
    ("auth_query", Same(Text)),
    ("auth_dbname", Same(Text)),
    ("syslog", Unsupported(REPLACED_BY_LOGS)),
    ("syslog_ident", Unsupported(REPLACED_BY_LOGS)),
    ("syslog_facility", Unsupported(REPLACED_BY_LOGS)),
    ("log_connections", Same(Bool)),
    ("log_disconnections", Same(Bool)),
    ("log_pooler_errors", NoOp("refused logins and closed clients are logged with their SQLSTATE")),
    ("log_stats", Same(Bool)),
    ("verbose", Unsupported("set the log level with RUST_LOG (for example RUST_LOG=debug)")),
    ("admin_users", Same(List)),
    ("stats_users", Same(List)),
    ("server_reset_query", Differs(Text, "also run in transaction mode after a client left session state (SET, temp tables), as PgBouncer's server_reset_query_always would")),
    ("server_reset_query_always", NoOp("the reset runs whenever a client left session state behind, in every pool mode")),
    ("server_check_delay", Same(Secs)),
    ("server_check_query", Same(Text)),
    ("server_fast_close", Unsupported("PAUSE, RECONNECT and RELOAD close servers when their clients release them")),
    ("server_lifetime", Differs(Secs, "spread with jitter so connections do not all reconnect at once")),
    ("server_idle_timeout", Same(Secs)),
    ("server_connect_timeout", Differs(Secs, "TCP connect and TLS only; login has its own server_login_timeout (the importer sets both)")),
    ("server_login_retry", Differs(Secs, "the base of an exponential back-off with full jitter (capped by server_login_retry_max), not a fixed wait")),
    ("client_login_timeout", Same(Secs)),
    ("autodb_idle_timeout", Same(Secs)),
    ("dns_max_ttl", Same(Secs)),
    ("dns_nxdomain_ttl", Same(Secs)),
    ("dns_zone_check_period", NoOp("names are looked up again when their TTL (clamped by dns_min_ttl/dns_max_ttl) runs out")),
    ("resolv_conf", Unsupported("use dns_nameservers to name the resolvers")),
    ("client_tls_sslmode", Same(Text)),
    ("client_tls_key_file", Same(Text)),
    ("client_tls_cert_file", Same(Text)),
    ("client_tls_ca_file", Same(Text)),
    ("client_tls_protocols", Unsupported("TLS 1.2 and 1.3 with rustls's safe cipher suites, fixed")),
    ("client_tls_ciphers", Unsupported("TLS 1.2 and 1.3 with rustls's safe cipher suites, fixed")),
    ("client_tls13_ciphers", Unsupported("TLS 1.2 and 1.3 with rustls's safe cipher suites, fixed")),
    ("client_tls_ecdhcurve", Unsupported("rustls chooses the key exchange")),
    ("client_tls_dheparams", Unsupported("rustls does not use finite-field Diffie-Hellman")),
    ("server_tls_sslmode", Same(Text)),
    ("server_tls_ca_file", Same(Text)),
    ("server_tls_key_file", Same(Text)),
    ("server_tls_cert_file", Same(Text)),
    ("server_tls_protocols", Unsupported("TLS 1.2 and 1.3 with rustls's safe cipher suites, fixed")),
    ("server_tls_ciphers", Unsupported("TLS 1.2 and 1.3 with rustls's safe cipher suites, fixed")),
    ("server_tls13_ciphers", Unsupported("TLS 1.2 and 1.3 with rustls's safe cipher suites, fixed")),
    ("query_timeout", Same(Secs)),
    ("query_wait_timeout", Same(Secs)),
    ("cancel_wait_timeout", Unsupported("cancel requests are forwarded at once, with a fixed bound")),
    ("client_idle_timeout", Same(Secs)),
    ("idle_transaction_timeout", Same(Secs)),
    ("transaction_timeout", Unsupported("no cap on a whole transaction yet: use query_timeout and idle_transaction_timeout")),
    ("suspend_timeout", NoOp("there is no SUSPEND (online restart) for it to time out; so_reuseport and shutdown_accept_delay do rolling restarts")),
    ("pkt_buf", NoOp("buffers grow as messages need, up to max_packet_size")),
    ("max_packet_size", Differs(Int, "Breakwater's default is 64 MiB rather than 2 GiB")),
    ("listen_backlog", NoOp("the listen backlog is 1024")),
    ("sbuf_loopcnt", NoOp("each client is its own task; the runtime keeps turns fair")),
    ("so_reuseport", Same(Bool)),
    ("tcp_defer_accept", Same(Bool)),
    ("tcp_socket_buffer", NoOp("the kernel's socket buffer sizes are used")),
    ("tcp_keepalive", Differs(Bool, "server sockets; the importer sets client_tcp_keepalive too (PgBouncer's applies to both sides); Breakwater's keepidle/keepintvl/keepcnt defaults are its own, not the OS's")),
    ("tcp_keepcnt", Differs(Int, "0 (PgBouncer: OS default) is not accepted; Breakwater's default is 3; the importer sets client_tcp_keepcnt too")),
    ("tcp_keepidle", Differs(Secs, "0 (PgBouncer: OS default) is not accepted; Breakwater's default is 15s (clients: 10s); the importer sets client_tcp_keepidle too")),
    ("tcp_keepintvl", Differs(Secs, "0 (PgBouncer: OS default) is not accepted; Breakwater's default is 5s; the importer sets client_tcp_keepintvl too")),
    ("tcp_user_timeout", Differs(Millis, "PgBouncer's default 0 leaves it off; Breakwater's default is 30s (clients: 20s); the importer sets client_tcp_user_timeout too")),
];

/// Keys with no equivalent whose value asks for nothing Breakwater does not already do: off
/// (PgBouncer's default, which generated configs write out) or empty. Such a line is accepted
/// with a warning instead of refused: (key, the harmless values, why).
const HARMLESS_VALUES: &[(&str, &[&str], &str)] = &[
    ("server_round_robin", &["0"], "0 reuses the most recently released server, as Breakwater's pools do"),
    ("disable_pqexec", &["0"], "0 allows multi-statement simple queries, as Breakwater does"),
    ("application_name_add_host", &["0"], "0 passes application_name through unchanged, as Breakwater does"),
    ("server_fast_close", &["0"], "0 lets servers finish their transaction before PAUSE, RECONNECT or RELOAD closes them, as Breakwater does"),
    ("transaction_timeout", &["0"], "0 means no cap on a whole transaction, as in Breakwater"),
    ("verbose", &["0"], "0 is the default log level (RUST_LOG sets another)"),
    ("syslog", &["0"], "0 means no syslog; Breakwater logs to stdout"),
    ("peer_id", &["0"], "0 means no peering"),
    ("logfile", &[""], "empty means no log file; Breakwater logs to stdout"),
    ("pidfile", &[""], "empty means no pid file"),
    ("user", &[""], "empty means no user switch"),
    ("auth_hba_file", &[""], "empty means no HBA file"),
    ("auth_ident_file", &[""], "empty means no ident map"),
    ("resolv_conf", &[""], "empty means the system resolver configuration"),
];

/// Why a key with no equivalent is harmless at `value` (see [`HARMLESS_VALUES`]); PgBouncer's
/// spellings of off (`off`, `no`, `false`) count as `0`.
pub fn harmless(key: &str, value: &str) -> Option<&'static str> {
    let v = value.trim();
    let v = match v.to_ascii_lowercase().as_str() {
        "off" | "no" | "false" => "0",
        _ => v,
    };
    HARMLESS_VALUES
        .iter()
        .find(|(k, values, _)| *k == key && values.contains(&v))
        .map(|(_, _, why)| *why)
}

/// The fate of a PgBouncer `[pgbouncer]` key, if it is one.
pub fn fate(key: &str) -> Option<Fate> {
    KEYS.iter().find(|(k, _)| *k == key).map(|(_, f)| *f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_values_of_keys_without_an_equivalent_are_harmless() {
        let cases = [
            ("server_round_robin", "0", true),
            ("server_round_robin", "off", true),
            ("server_round_robin", "1", false),
            ("logfile", "", true),
            ("logfile", "/var/log/pgbouncer.log", false),
            ("transaction_timeout", "0", true),
            ("transaction_timeout", "30", false),
            ("listen_port", "0", false),
        ];
        for (key, value, want) in cases {
            assert_eq!(harmless(key, value).is_some(), want, "{key} = {value:?}");
        }
        // Every harmless key is one PgBouncer has and Breakwater otherwise refuses.
        for (key, ..) in HARMLESS_VALUES {
            assert!(
                matches!(fate(key), Some(Fate::Unsupported(_))),
                "{key} is not an unsupported PgBouncer key"
            );
        }
    }
}
