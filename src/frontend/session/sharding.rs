//! Sharded maps: which shard a statement's transaction runs on, decided before a
//! server connection is borrowed. The planner (`routing::shard_plan`) says where a
//! statement's keys live; this module applies that to the session: one shard per
//! transaction, cross-shard statements to the fan-out executor (`fanout.rs`), and
//! refusals as real errors. Unsharded maps never come here.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Expect, Op, Session, SessionError};
use crate::protocol::messages::{self, btag};
use crate::routing::analyze::{Analyzed, StatementClass};

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// The transaction status the client believes in.
    pub(super) fn client_status(&self) -> u8 {
        match (&self.server, &self.pending_begin) {
            (Some(conn), _) => conn.txn_status,
            (None, Some(_)) => b'T',
            (None, None) => b'I',
        }
    }

    /// Routes one simple-protocol statement of a sharded map. Returns true when the
    /// statement was answered here (deferred BEGIN, refusal, cross-shard execution);
    /// otherwise `next_shard` names the shard the caller borrows from.
    pub(super) async fn route_sharded_query(
        &mut self,
        sql: &str,
        analyzed: &Analyzed,
    ) -> Result<bool, SessionError> {
        if self.server.is_none() && self.defer_transaction_control(sql, analyzed) {
            return Ok(true);
        }
        Ok(false)
    }

    /// `BEGIN` without a server: answered here, sent later on the shard of the
    /// transaction's first statement. `COMMIT`/`ROLLBACK` of a transaction that never
    /// ran a statement: answered here too.
    fn defer_transaction_control(&mut self, sql: &str, analyzed: &Analyzed) -> bool {
        match analyzed.class {
            StatementClass::Begin { .. } if self.pending_begin.is_none() => {
                self.pending_begin = Some((sql.to_owned(), *analyzed));
                self.answer(&["BEGIN"], b'T');
                true
            }
            StatementClass::TxnControl if self.pending_begin.is_some() => {
                let first = crate::frontend::session_sql::strip_leading_comments(sql)
                    .split(|c: char| c.is_whitespace() || c == ';')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                let tag = match first.as_str() {
                    "commit" | "end" => "COMMIT",
                    "rollback" | "abort" => "ROLLBACK",
                    // SAVEPOINT and friends need the transaction on a server.
                    _ => return false,
                };
                self.pending_begin = None;
                self.answer(&[tag], b'I');
                true
            }
            _ => false,
        }
    }

    /// Answers a simple Query ourselves: CommandCompletes, then ReadyForQuery.
    fn answer(&mut self, tags: &[&str], status: u8) {
        let mut out = BytesMut::new();
        for tag in tags {
            messages::command_complete(&mut out, tag);
        }
        messages::ready_for_query(&mut out, status);
        self.push_synthetic_bytes(out.freeze());
    }

    /// Refuses a statement with SQLSTATE 0A000. Outside a transaction the proxy
    /// answers; inside one the server raises the error, so the transaction fails there
    /// exactly as it would for a server error (later statements get 25P02).
    #[allow(dead_code)] // called by key routing, which lands with the shard planner
    pub(super) async fn refuse_query(&mut self, message: &str) -> Result<(), SessionError> {
        tracing::debug!(message, "statement refused");
        if self.server.is_none() && self.pending_begin.is_none() {
            let mut out = BytesMut::new();
            messages::error_fields(&mut out, btag::ERROR_RESPONSE, "ERROR", "0A000", message);
            messages::ready_for_query(&mut out, b'I');
            self.push_synthetic_bytes(out.freeze());
            return Ok(());
        }
        if self.server.is_none() {
            self.next_shard = self.fe.default_shard;
            self.ensure_server(None).await?;
        }
        messages::query(&mut self.sout, &raise_sql(message));
        self.push(Op::Forward(Expect::Query));
        Ok(())
    }
}

/// A statement that makes the server raise `message` with SQLSTATE 0A000.
#[allow(dead_code)]
fn raise_sql(message: &str) -> String {
    format!(
        "DO $shardgate$ BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = {}; END $shardgate$",
        crate::backend::params::quote_literal(&message.replace("$shardgate$", ""))
    )
}
