//! Connection strings and tokio-postgres clients for tests, shared by the cluster and the pooler.
//! Never TLS: the test kit tests the wire protocol in the clear.

/// A key=value connection string; values are quoted when they must be.
pub(crate) fn conn_string(host: &str, port: u16, user: &str, password: &str, db: &str) -> String {
    format!(
        "host={} port={port} user={} password={} dbname={}",
        quote(host),
        quote(user),
        quote(password),
        quote(db)
    )
}

fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Connects and spawns the connection task on the current runtime; the task ends quietly when the
/// other side goes away (tests kill servers on purpose).
pub(crate) async fn connect(
    conn_string: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_string, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_need_it_are_quoted_and_parse_back() {
        let cases = [
            ("app_pw", "app_pw"),
            ("", "''"),
            ("two words", "'two words'"),
            ("it's", r"'it\'s'"),
            (r"back\slash", r"'back\\slash'"),
        ];
        for (value, quoted) in cases {
            assert_eq!(quote(value), quoted, "quoting {value:?}");
            let config: tokio_postgres::Config = conn_string("127.0.0.1", 5432, "u", value, "d")
                .parse()
                .unwrap();
            assert_eq!(config.get_password(), Some(value.as_bytes()), "{value:?}");
        }
    }
}
