//! The console's query loop, after the admin logged in to the database `shardgate`:
//! simple-protocol queries are parsed into commands (`commands`) and answered with
//! tables (`show`, `table`). The extended protocol is answered with one error per
//! batch (up to Sync), so tools that prepare statements get an error, never a hang.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::commands::{self, Command};
use super::table::{self, Cell, ColumnType, Table};
use crate::app::reload::{ReloadError, ReloadOutcome};
use crate::frontend::Frontend;
use crate::protocol::messages::tag;
use crate::protocol::{decode_frame, messages};

/// Parameters a client expects after login; libpq reads `server_version` to decide
/// which catalog queries psql may send (none reach the console).
const PARAMETERS: [(&str, &str); 7] = [
    ("server_version", "16.0 (shardgate console)"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
];

/// Greets the logged-in admin and answers commands until the client leaves or the
/// proxy shuts down.
pub async fn run<S>(
    stream: &mut S,
    mut buf: BytesMut,
    fe: Arc<Frontend>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    for (name, value) in PARAMETERS {
        messages::parameter_status(&mut out, name, value);
    }
    table::ready_for_query(&mut out);
    let mut console = Console {
        fe,
        skipping: false,
    };
    loop {
        loop {
            match decode_frame(&mut buf, console.fe.settings.max_message_size) {
                Ok(Some(frame)) => {
                    if !console.handle(frame, &mut out).await {
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    table::error(&mut out, "08P01", &error.to_string());
                    let _ = stream.write_all(&out).await;
                    return;
                }
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        tokio::select! {
            read = stream.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                let mut out = BytesMut::new();
                messages::error_fields(&mut out, b'E', "FATAL", "57P01", "the proxy is shutting down");
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

struct Console {
    fe: Arc<Frontend>,
    /// After answering an extended-protocol message with an error, everything up to
    /// Sync is ignored, as a server does.
    skipping: bool,
}

impl Console {
    /// Answers one client message; false when the connection should end.
    async fn handle(&mut self, frame: crate::protocol::Frame, out: &mut BytesMut) -> bool {
        match frame.tag {
            tag::QUERY => {
                match messages::decode_query(&frame) {
                    Ok(text) => self.query(text, out).await,
                    Err(error) => table::error(out, "08P01", &error.to_string()),
                }
                table::ready_for_query(out);
            }
            tag::SYNC => {
                self.skipping = false;
                table::ready_for_query(out);
            }
            tag::TERMINATE => return false,
            tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::FUNCTION_CALL => {
                if !self.skipping {
                    table::error(
                        out,
                        "0A000",
                        "the admin console answers the simple query protocol only (psql, or simple_query in drivers)",
                    );
                    self.skipping = true;
                }
                if frame.tag == tag::FUNCTION_CALL {
                    // FunctionCall is not part of a batch: it ends with ReadyForQuery.
                    self.skipping = false;
                    table::ready_for_query(out);
                }
            }
            tag::FLUSH | tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
            other => {
                table::error(
                    out,
                    "08P01",
                    &format!("unexpected message type '{}'", other as char),
                );
                return false;
            }
        }
        true
    }

    /// Runs each statement of a simple query; the first error ends the query, as a
    /// server's implicit transaction does.
    async fn query(&mut self, text: &str, out: &mut BytesMut) {
        let statements = split_statements(text);
        if statements.is_empty() {
            table::empty_query(out);
            return;
        }
        for statement in statements {
            tracing::info!(command = statement, "admin console");
            if let Err((code, message)) = self.command(statement, out).await {
                table::error(out, code, &message);
                return;
            }
        }
    }

    async fn command(&mut self, text: &str, out: &mut BytesMut) -> Result<(), (&str, String)> {
        let command = commands::parse(text).map_err(|e| (e.sqlstate(), e.to_string()))?;
        match command {
            Command::Show(what) => {
                for t in super::show::show(&self.fe, what) {
                    t.encode(out);
                }
            }
            Command::Help => super::show::show(&self.fe, commands::Show::Help)
                .iter()
                .for_each(|t| t.encode(out)),
            Command::Set => table::command_complete(out, "SET"),
            Command::Reload => self.reload().await?.encode(out),
            Command::Pause(shard) => {
                self.known_shard(shard.as_deref())?;
                self.fe.pauses.pause(shard.as_deref());
                table::command_complete(out, "PAUSE");
            }
            Command::Resume(shard) => {
                self.known_shard(shard.as_deref())?;
                self.fe.pauses.resume(shard.as_deref());
                table::command_complete(out, "RESUME");
            }
            Command::Promote { shard, node } => {
                self.promote(&shard, node.as_deref()).await?.encode(out)
            }
            Command::ReshardCancel => {
                self.fe
                    .reshard
                    .cancel()
                    .map_err(|e| ("55000", format!("RESHARD CANCEL: {e}")))?;
                table::command_complete(out, "RESHARD CANCEL");
            }
        }
        Ok(())
    }

    fn known_shard(&self, shard: Option<&str>) -> Result<(), (&'static str, String)> {
        let Some(name) = shard else {
            return Ok(());
        };
        let topology = self.fe.topology.load();
        if topology.shards.iter().any(|s| s.name == name) {
            return Ok(());
        }
        let known: Vec<&str> = topology.shards.iter().map(|s| s.name.as_str()).collect();
        Err((
            "42704",
            format!(
                "shard \"{name}\" does not exist; shards: {}",
                known.join(", ")
            ),
        ))
    }

    async fn reload(&self) -> Result<Table, (&'static str, String)> {
        let result = self
            .fe
            .admin
            .reload()
            .await
            .ok_or(("55000", "this proxy has no shard map reloader".to_owned()))?;
        let (outcome, from, to) = match result {
            Ok(ReloadOutcome::Unchanged) => {
                let v = self.fe.topology.load().map.version;
                ("unchanged", v, v)
            }
            Ok(ReloadOutcome::Applied { from, to }) => ("applied", from, to),
            Ok(ReloadOutcome::ReshardStarted { from, to, .. }) => ("reshard started", from, to),
            Err(error) => {
                let code = if matches!(
                    error,
                    ReloadError::Ownership { .. } | ReloadError::JobRunning { .. }
                ) {
                    "0A000"
                } else {
                    "F0000"
                };
                return Err((code, format!("RELOAD refused: {error}")));
            }
        };
        let mut t = Table::new(&[
            ("result", ColumnType::Text),
            ("from_version", ColumnType::Int8),
            ("to_version", ColumnType::Int8),
        ]);
        t.push(vec![outcome.into(), from.into(), to.into()]);
        t.tag = "RELOAD";
        Ok(t)
    }

    async fn promote(
        &self,
        shard: &str,
        node: Option<&str>,
    ) -> Result<Table, (&'static str, String)> {
        self.known_shard(Some(shard))?;
        let Some(promoter) = self.fe.admin.promoter().cloned() else {
            return Err((
                "0A000",
                "PROMOTE is not available yet: this proxy has no promotion support wired in"
                    .to_owned(),
            ));
        };
        let summary = promoter
            .promote(shard, node)
            .await
            .map_err(|why| ("55000", format!("PROMOTE {shard} refused: {why}")))?;
        let mut t = Table::new(&[("shard", ColumnType::Text), ("result", ColumnType::Text)]);
        t.push(vec![shard.into(), Cell::from(summary)]);
        t.tag = "PROMOTE";
        Ok(t)
    }
}

/// Splits a simple query on semicolons outside double quotes; blank statements are
/// dropped.
fn split_statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::split_statements;

    #[test]
    fn splits_outside_quotes() {
        assert_eq!(
            split_statements("SHOW MAP; SHOW NODES;"),
            ["SHOW MAP", " SHOW NODES"]
        );
        assert_eq!(split_statements("PAUSE \"a;b\""), ["PAUSE \"a;b\""]);
        assert!(split_statements(" ; ").is_empty());
    }
}
