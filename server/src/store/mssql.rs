//! SQL Server store through tiberius (rustls), for production behind the runbook's AG listener.
//!
//! Fenced writes read the fence row `WITH (UPDLOCK, HOLDLOCK)` inside the transaction: a
//! promotion's UPDATE of that row must wait for the lock, so each fenced commit is ordered
//! entirely before or after any promotion. Every statement sent is a constant in [`sql`] or a
//! multi-row [`multi::Shape`], so the unit tests can parse all of them as T-SQL. The import and
//! compose paths send a few multi-row statements per page or chunk, not one per object: each
//! statement is a round trip, and to an availability-group listener those trips, not the
//! statements, bound the import rate.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use tiberius::{Client, Config, Row, ToSql};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::migrations::MSSQL;
use super::*;

type Conn = Client<Compat<TcpStream>>;

/// Every statement the SQL Server store sends.
pub mod sql {
    pub const BEGIN: &str = "BEGIN TRANSACTION";
    pub const COMMIT: &str = "COMMIT TRANSACTION";
    pub const ROLLBACK: &str = "ROLLBACK TRANSACTION";
    /// The procedure's return value as a result set: below 0 means not granted.
    pub const MIGRATION_LOCK: &str = "DECLARE @r INT; EXEC @r = sp_getapplock @Resource = N'identitymesh_schema', @LockMode = N'Exclusive', @LockOwner = N'Transaction', @LockTimeout = 60000; SELECT @r";
    /// Every session waits at most this long for a lock (see `LOCK_WAIT_MS`).
    pub const SESSION_SETUP: &str = "SET LOCK_TIMEOUT 10000";
    pub const MIGRATIONS_TABLE_EXISTS: &str =
        "SELECT COUNT(*) FROM sys.tables WHERE name = N'schema_migrations'";
    pub const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE schema_migrations (version INT NOT NULL PRIMARY KEY, name NVARCHAR(256) NOT NULL, applied_at BIGINT NOT NULL)";
    pub const APPLIED_MIGRATIONS: &str = "SELECT version FROM schema_migrations";
    pub const RECORD_MIGRATION: &str =
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (@P1, @P2, @P3)";
    pub const PING: &str = "SELECT 1";
    pub const FENCE: &str = "SELECT epoch, holder, holder_incarnation FROM fence WHERE id = 1";
    pub const FENCE_LOCKED: &str =
        "SELECT epoch, holder, holder_incarnation FROM fence WITH (UPDLOCK, HOLDLOCK) WHERE id = 1";
    pub const SET_FENCE: &str = "UPDATE fence SET epoch = @P1, holder = @P2, holder_incarnation = @P3, updated_at = @P4 WHERE id = 1";
    pub const FENCE_OTHER_ACTIVES: &str = "UPDATE engine_instances SET role = N'fenced' WHERE role = N'active' AND NOT (instance = @P1 AND incarnation = @P2)";
    pub const JOURNAL: &str =
        "INSERT INTO fence_journal (kind, epoch, instance, at) VALUES (@P1, @P2, @P3, @P4)";
    pub const READ_JOURNAL: &str = "SELECT kind, epoch FROM fence_journal ORDER BY seq";
    pub const UPDATE_INSTANCE: &str = "UPDATE engine_instances SET host = @P2, role = @P3, epoch = @P4, version = @P5, started_at = @P6, last_heartbeat = @P7 WHERE instance = @P1 AND incarnation = @P8";
    pub const INSERT_INSTANCE: &str = "INSERT INTO engine_instances (instance, host, role, epoch, version, started_at, last_heartbeat, incarnation) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8)";
    pub const INSTANCES: &str = "SELECT instance, host, role, epoch, version, started_at, last_heartbeat, incarnation FROM engine_instances WHERE last_heartbeat >= @P1 ORDER BY instance, started_at";
    pub const UPDATE_ENGINE_STATE: &str =
        "UPDATE engine_state SET holder = @P1, epoch = @P2, last_tick = @P3 WHERE id = 1";
    pub const INSERT_ENGINE_STATE: &str =
        "INSERT INTO engine_state (id, holder, epoch, last_tick) VALUES (1, @P1, @P2, @P3)";
    pub const MARK_UNSEEN_DELETED: &str = "UPDATE cs_objects SET deleted = 1, dirty = 1, rev = rev + 1, updated_at = @P1 WHERE connector_id = @P2 AND object_type = @P3 AND deleted = 0 AND (seen_run IS NULL OR seen_run <> @P4)";
    /// The end of an import page, in one request: the watermark when it has one (@P4), the
    /// batch record and its sequence number, then the fence journal entry. @P1 connector,
    /// @P2 object type, @P3 object count, @P5 epoch, @P6 instance, @P7 now.
    pub const IMPORT_TAIL: &str = "MERGE watermarks AS t USING (SELECT @P1 AS connector_id, @P2 AS object_type WHERE @P4 IS NOT NULL) AS v ON t.connector_id = v.connector_id AND t.object_type = v.object_type WHEN MATCHED THEN UPDATE SET value = @P4, updated_at = @P7 WHEN NOT MATCHED THEN INSERT (connector_id, object_type, value, updated_at) VALUES (@P1, @P2, @P4, @P7); INSERT INTO import_batches (connector_id, object_type, object_count, watermark, epoch, instance, committed_at) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7); SELECT CAST(SCOPE_IDENTITY() AS BIGINT); INSERT INTO fence_journal (kind, epoch, instance, at) VALUES (N'batch', @P5, @P6, @P7)";
    pub const WATERMARK: &str =
        "SELECT value FROM watermarks WHERE connector_id = @P1 AND object_type = @P2";
    pub const COUNT_OBJECTS: &str = "SELECT COUNT_BIG(*) FROM cs_objects WHERE connector_id = @P1";
    pub const COUNT_BATCHES: &str =
        "SELECT COUNT_BIG(*) FROM import_batches WHERE connector_id = @P1";
    pub const UPDATE_TOKEN: &str = "UPDATE api_tokens SET token_hash = @P2 WHERE name = @P1";
    pub const INSERT_TOKEN: &str =
        "INSERT INTO api_tokens (name, token_hash, created_at) VALUES (@P1, @P2, @P3)";
    pub const TOKEN: &str = "SELECT token_hash FROM api_tokens WHERE name = @P1";
    pub const INSERT_AUDIT: &str =
        "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (@P1, @P2, @P3, @P4, @P5)";
    /// @P1 actor, @P2 action exactly, @P3 an action prefix as a LIKE pattern (escaped with
    /// `\`), @P4 since (inclusive), @P5 until (exclusive), @P6 the limit; NULL: no filter.
    pub const AUDIT: &str = "SELECT TOP (@P6) at, actor, action, target, detail FROM audit_log WHERE (@P1 IS NULL OR actor = @P1) AND (@P2 IS NULL OR action = @P2) AND (@P3 IS NULL OR action LIKE @P3 ESCAPE '\\') AND (@P4 IS NULL OR at >= @P4) AND (@P5 IS NULL OR at < @P5) ORDER BY seq DESC";

    pub const INSERT_RELAY: &str =
        "INSERT INTO relays (id, name, token_hash, created_at) VALUES (@P1, @P2, @P3, @P4)";
    pub const RELAY_BY_HASH: &str = "SELECT id, name, created_at, revoked_at, last_seen, version, connected_instance, connected_since FROM relays WHERE token_hash = @P1";
    pub const RELAYS: &str = "SELECT id, name, created_at, revoked_at, last_seen, version, connected_instance, connected_since FROM relays ORDER BY name";
    pub const REVOKE_RELAY: &str = "UPDATE relays SET revoked_at = COALESCE(revoked_at, @P2), connected_instance = NULL, connected_since = NULL WHERE id = @P1";
    pub const RELAY_CONNECTED: &str = "UPDATE relays SET connected_instance = @P2, connected_since = @P4, last_seen = @P4, version = @P3 WHERE id = @P1";
    pub const RELAY_SEEN: &str = "UPDATE relays SET last_seen = @P2 WHERE id = @P1";
    pub const RELAY_DISCONNECTED: &str = "UPDATE relays SET connected_instance = NULL, connected_since = NULL, last_seen = @P3 WHERE id = @P1 AND connected_instance = @P2";

    // Administrative upserts take a key-range lock in the UPDATE (UPDLOCK, SERIALIZABLE), so a
    // concurrent upsert of the same key waits instead of racing to a duplicate INSERT.
    pub const UPDATE_CONNECTOR: &str = "UPDATE connectors WITH (UPDLOCK, SERIALIZABLE) SET name = @P2, kind = @P3, config_json = @P4, rules_json = @P5, relay_id = @P6, is_canary = @P7, updated_at = @P9 WHERE id = @P1";
    pub const INSERT_CONNECTOR: &str = "INSERT INTO connectors (id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8, @P9)";
    pub const CONNECTOR: &str = "SELECT id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at FROM connectors WHERE id = @P1";
    pub const CONNECTORS: &str = "SELECT id, name, kind, config_json, rules_json, relay_id, is_canary, created_at, updated_at FROM connectors ORDER BY name";
    pub const CONNECTOR_OBJECTS: &str =
        "SELECT COUNT_BIG(*) FROM cs_objects WHERE connector_id = @P1";
    pub const DELETE_CONNECTOR_SCHEDULES: &str = "DELETE FROM schedules WHERE connector_id = @P1";
    pub const DELETE_CONNECTOR_WATERMARKS: &str = "DELETE FROM watermarks WHERE connector_id = @P1";
    pub const DELETE_CONNECTOR: &str = "DELETE FROM connectors WHERE id = @P1";
    /// Oldest first, at most @P2 rows older than @P1.
    pub const PRUNE_RUNS: &str = "DELETE FROM runs WHERE id IN (SELECT TOP (@P2) id FROM runs WHERE finished_at < @P1 AND status <> N'running' ORDER BY finished_at)";
    pub const PRUNE_AUDIT: &str = "DELETE FROM audit_log WHERE seq IN (SELECT TOP (@P2) seq FROM audit_log WHERE at < @P1 ORDER BY at)";
    pub const PRUNE_BATCHES: &str = "DELETE FROM import_batches WHERE seq IN (SELECT TOP (@P2) seq FROM import_batches WHERE committed_at < @P1 ORDER BY committed_at)";
    pub const PRUNE_JOURNAL: &str = "DELETE FROM fence_journal WHERE seq IN (SELECT TOP (@P2) seq FROM fence_journal WHERE at < @P1 ORDER BY at)";
    pub const CURRENT_EPOCH_RUN: &str = "SELECT TOP (1) id FROM runs WHERE connector_id = @P1 AND status = N'running' AND epoch >= (SELECT epoch FROM fence WHERE id = 1)";
    pub const CONNECTOR_EXISTS: &str = "SELECT 1 FROM connectors WHERE id = @P1";
    pub const OBJECT_TYPES_OF: &str =
        "SELECT DISTINCT object_type FROM cs_objects WHERE connector_id = @P1 ORDER BY object_type";

    pub const UPDATE_SCHEDULE: &str = "UPDATE schedules WITH (UPDLOCK, SERIALIZABLE) SET connector_id = @P2, kind = @P3, spec = @P4, run_mode = @P5, enabled = @P6, next_run = @P7 WHERE id = @P1";
    pub const INSERT_SCHEDULE: &str = "INSERT INTO schedules (id, connector_id, kind, spec, run_mode, enabled, next_run, created_at) VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8)";
    pub const SCHEDULES: &str = "SELECT id, connector_id, kind, spec, run_mode, enabled, next_run, created_at FROM schedules ORDER BY created_at, id";
    pub const DELETE_SCHEDULE: &str = "DELETE FROM schedules WHERE id = @P1";
    pub const SET_SCHEDULE_NEXT_RUN: &str = "UPDATE schedules SET next_run = @P2 WHERE id = @P1";

    pub const SETTING: &str = "SELECT value FROM settings WHERE name = @P1";
    pub const UPDATE_SETTING: &str =
        "UPDATE settings WITH (UPDLOCK, SERIALIZABLE) SET value = @P2 WHERE name = @P1";
    pub const INSERT_SETTING: &str = "INSERT INTO settings (name, value) VALUES (@P1, @P2)";

    pub const UPDATE_SECRET: &str = "UPDATE secrets WITH (UPDLOCK, SERIALIZABLE) SET key_id = @P2, nonce = @P3, ciphertext = @P4, updated_at = @P5 WHERE ref = @P1";
    pub const INSERT_SECRET: &str = "INSERT INTO secrets (ref, key_id, nonce, ciphertext, updated_at) VALUES (@P1, @P2, @P3, @P4, @P5)";
    pub const SECRET: &str =
        "SELECT ref, key_id, nonce, ciphertext, updated_at FROM secrets WHERE ref = @P1";
    /// Values stay in the database: the listing carries names, key ids and times only.
    pub const SECRETS: &str = "SELECT ref, key_id, updated_at FROM secrets ORDER BY ref";
    pub const DELETE_SECRET: &str = "DELETE FROM secrets WHERE ref = @P1";

    pub const ABANDON_OLD_RUNS: &str = "UPDATE runs SET status = N'abandoned', finished_at = @P1, error = N'the instance running it lost the active role' WHERE connector_id = @P2 AND status = N'running' AND epoch < @P3";
    pub const RUNNING_RUN: &str =
        "SELECT TOP (1) id FROM runs WHERE connector_id = @P1 AND status = N'running'";
    pub const INSERT_RUN: &str = "INSERT INTO runs (id, connector_id, instance, epoch, status, started_at, run_mode, trigger_kind) VALUES (@P1, @P2, @P3, @P4, N'running', @P5, @P6, @P7)";
    pub const FINISH_RUN: &str = "UPDATE runs SET status = @P2, finished_at = @P3, added = @P4, updated = @P5, unchanged = @P6, deleted = @P7, failed = @P8, error = @P9, errors_json = @P10 WHERE id = @P1 AND status = N'running'";
    pub const RUN: &str = "SELECT id, connector_id, instance, epoch, run_mode, trigger_kind, status, started_at, finished_at, added, updated, unchanged, deleted, failed, error, errors_json FROM runs WHERE id = @P1";
    pub const RUNS: &str = "SELECT TOP (@P2) id, connector_id, instance, epoch, run_mode, trigger_kind, status, started_at, finished_at, added, updated, unchanged, deleted, failed, error, errors_json FROM runs WHERE (@P1 IS NULL OR connector_id = @P1) ORDER BY started_at DESC, id";

    pub const DIRTY_OBJECTS: &str = "SELECT TOP (@P2) anchor, object_type, attributes_json, deleted, rev FROM cs_objects WHERE connector_id = @P1 AND dirty = 1 ORDER BY updated_at, anchor";
    /// @P1 connector, @P2 the ruled object types as a JSON array.
    pub const MARK_FOR_RECOMPOSE: &str = "UPDATE cs_objects SET dirty = 1 WHERE connector_id = @P1 AND dirty = 0 AND (object_type IN (SELECT value FROM OPENJSON(@P2)) OR EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = cs_objects.connector_id AND l.anchor = cs_objects.anchor))";
    /// @P1 connector, @P2 the ruled object types as a JSON array, @P3 the limit.
    pub const DROP_UNRULED_TOMBSTONES: &str = "DELETE FROM cs_objects WHERE connector_id = @P1 AND anchor IN (SELECT TOP (@P3) o.anchor FROM cs_objects o WHERE o.connector_id = @P1 AND o.dirty = 1 AND o.deleted = 1 AND o.object_type NOT IN (SELECT value FROM OPENJSON(@P2)) AND NOT EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = o.connector_id AND l.anchor = o.anchor))";
    /// As DROP_UNRULED_TOMBSTONES, for the objects that remain.
    pub const SETTLE_UNRULED: &str = "UPDATE cs_objects SET dirty = 0 WHERE connector_id = @P1 AND anchor IN (SELECT TOP (@P3) o.anchor FROM cs_objects o WHERE o.connector_id = @P1 AND o.dirty = 1 AND o.object_type NOT IN (SELECT value FROM OPENJSON(@P2)) AND NOT EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = o.connector_id AND l.anchor = o.anchor))";
    pub const LINK: &str = "SELECT connector_id, anchor, identity_id, precedence, contribution_json FROM identity_links WHERE connector_id = @P1 AND anchor = @P2";
    pub const LINKS_OF_IDENTITY: &str = "SELECT connector_id, anchor, identity_id, precedence, contribution_json FROM identity_links WHERE identity_id = @P1 ORDER BY precedence, connector_id";
    pub const IDENTITIES_BY_KEY: &str = "SELECT TOP (16) identity_id FROM identity_keys WHERE attr = @P1 AND value = @P2 ORDER BY identity_id";
    pub const IDENTITY: &str = "SELECT id, display_name, attributes_json, created_at, updated_at FROM identities WHERE id = @P1";
    /// @P1: the LIKE pattern (escaped with `\`), @P2: the search as an exact id, @P3: the
    /// keyset cursor, @P4: the page size. LOWER on both sides keeps the match case-insensitive
    /// under a case-sensitive collation too.
    pub const IDENTITIES: &str = "SELECT TOP (@P4) id, display_name, attributes_json, created_at, updated_at FROM identities WHERE (@P1 IS NULL OR LOWER(display_name) LIKE LOWER(@P1) ESCAPE '\\' OR id = @P2) AND (@P3 IS NULL OR id > @P3) ORDER BY id";
    pub const COUNT_IDENTITIES: &str = "SELECT COUNT_BIG(*) FROM identities";
    /// A page of a connector space: @P1 connector, @P2 the anchor's LIKE pattern and @P3 the
    /// attributes JSON's (escaped with `\`; NULL: no search), @P4 the page size. LOWER as in
    /// IDENTITIES. The `dn` is read only from valid JSON (JSON_VALUE fails on invalid text).
    pub const CONNECTOR_SPACE: &str = "SELECT TOP (@P4) o.anchor, o.object_type, CASE WHEN ISJSON(o.attributes_json) = 1 THEN JSON_VALUE(o.attributes_json, '$.dn') END, o.deleted, l.identity_id FROM cs_objects o LEFT JOIN identity_links l ON l.connector_id = o.connector_id AND l.anchor = o.anchor WHERE o.connector_id = @P1 AND (@P2 IS NULL OR LOWER(o.anchor) LIKE LOWER(@P2) ESCAPE '\\' OR LOWER(o.attributes_json) LIKE LOWER(@P3) ESCAPE '\\') ORDER BY o.anchor";
    /// CONNECTOR_SPACE after the keyset cursor @P5: a separate statement, so the clustered key
    /// is sought to the cursor instead of read from the connector's first row.
    pub const CONNECTOR_SPACE_AFTER: &str = "SELECT TOP (@P4) o.anchor, o.object_type, CASE WHEN ISJSON(o.attributes_json) = 1 THEN JSON_VALUE(o.attributes_json, '$.dn') END, o.deleted, l.identity_id FROM cs_objects o LEFT JOIN identity_links l ON l.connector_id = o.connector_id AND l.anchor = o.anchor WHERE o.connector_id = @P1 AND o.anchor > @P5 AND (@P2 IS NULL OR LOWER(o.anchor) LIKE LOWER(@P2) ESCAPE '\\' OR LOWER(o.attributes_json) LIKE LOWER(@P3) ESCAPE '\\') ORDER BY o.anchor";
    pub const CONNECTOR_OBJECT: &str = "SELECT o.anchor, o.object_type, o.attributes_json, o.deleted, o.dirty, o.seen_run, o.updated_at, l.identity_id FROM cs_objects o LEFT JOIN identity_links l ON l.connector_id = o.connector_id AND l.anchor = o.anchor WHERE o.connector_id = @P1 AND o.anchor = @P2";

    /// All of the above, for the syntax test.
    pub const ALL: &[&str] = &[
        INSERT_RELAY,
        RELAY_BY_HASH,
        RELAYS,
        REVOKE_RELAY,
        RELAY_CONNECTED,
        RELAY_SEEN,
        RELAY_DISCONNECTED,
        BEGIN,
        COMMIT,
        ROLLBACK,
        MIGRATION_LOCK,
        SESSION_SETUP,
        MIGRATIONS_TABLE_EXISTS,
        CREATE_MIGRATIONS_TABLE,
        APPLIED_MIGRATIONS,
        RECORD_MIGRATION,
        PING,
        FENCE,
        FENCE_LOCKED,
        SET_FENCE,
        FENCE_OTHER_ACTIVES,
        JOURNAL,
        READ_JOURNAL,
        UPDATE_INSTANCE,
        INSERT_INSTANCE,
        INSTANCES,
        UPDATE_ENGINE_STATE,
        INSERT_ENGINE_STATE,
        MARK_UNSEEN_DELETED,
        IMPORT_TAIL,
        WATERMARK,
        COUNT_OBJECTS,
        COUNT_BATCHES,
        UPDATE_TOKEN,
        INSERT_TOKEN,
        TOKEN,
        INSERT_AUDIT,
        AUDIT,
        UPDATE_CONNECTOR,
        INSERT_CONNECTOR,
        CONNECTOR,
        CONNECTORS,
        CONNECTOR_OBJECTS,
        DELETE_CONNECTOR_SCHEDULES,
        CURRENT_EPOCH_RUN,
        PRUNE_RUNS,
        PRUNE_AUDIT,
        PRUNE_BATCHES,
        PRUNE_JOURNAL,
        CONNECTOR_EXISTS,
        OBJECT_TYPES_OF,
        DELETE_CONNECTOR_WATERMARKS,
        DELETE_CONNECTOR,
        UPDATE_SCHEDULE,
        INSERT_SCHEDULE,
        SCHEDULES,
        DELETE_SCHEDULE,
        SET_SCHEDULE_NEXT_RUN,
        SETTING,
        UPDATE_SETTING,
        INSERT_SETTING,
        UPDATE_SECRET,
        INSERT_SECRET,
        SECRET,
        SECRETS,
        DELETE_SECRET,
        ABANDON_OLD_RUNS,
        RUNNING_RUN,
        INSERT_RUN,
        FINISH_RUN,
        RUN,
        RUNS,
        DIRTY_OBJECTS,
        MARK_FOR_RECOMPOSE,
        DROP_UNRULED_TOMBSTONES,
        SETTLE_UNRULED,
        LINK,
        LINKS_OF_IDENTITY,
        IDENTITIES_BY_KEY,
        IDENTITY,
        IDENTITIES,
        COUNT_IDENTITIES,
        CONNECTOR_SPACE,
        CONNECTOR_SPACE_AFTER,
        CONNECTOR_OBJECT,
    ];
}

/// The multi-row statements of the import and compose paths. Their text depends on how many
/// rows they carry, so each is a [`Shape`]: the shared parameters come first (`@P1`…), then
/// each row's, and [`Shape::max_rows`] is how many rows one statement may carry.
pub mod multi {
    use std::fmt::Write;

    /// SQL Server takes at most 1,000 row constructors in a VALUES list...
    pub const MAX_ROWS: usize = 1000;
    /// ...and at most 2,100 parameters in a request, sp_executesql's `@stmt` and `@params`
    /// among them.
    pub const MAX_PARAMS: usize = 2100;
    /// Parameters left unused: sp_executesql's two, and some to spare.
    const MARGIN: usize = 10;

    pub struct Shape {
        pub name: &'static str,
        /// Parameters bound once, before the rows.
        pub shared: usize,
        pub per_row: usize,
        /// Each row ends with its position, a literal, for an ORDER BY.
        pub numbered: bool,
        /// The statement around its rendered VALUES rows.
        text: fn(&str) -> String,
    }

    impl Shape {
        /// Rows one statement may carry: as many as both limits allow.
        pub const fn max_rows(&self) -> usize {
            let by_params = (MAX_PARAMS - MARGIN - self.shared) / self.per_row;
            if by_params < MAX_ROWS {
                by_params
            } else {
                MAX_ROWS
            }
        }

        /// Parameters a statement of `rows` rows binds.
        pub fn params(&self, rows: usize) -> usize {
            self.shared + rows * self.per_row
        }

        /// The statement's text for `rows` rows.
        pub fn sql(&self, rows: usize) -> String {
            let mut r = String::with_capacity(rows * self.per_row * 8);
            let mut p = self.shared;
            for i in 0..rows {
                r.push_str(if i == 0 { "(" } else { ", (" });
                for j in 0..self.per_row {
                    p += 1;
                    // Writing to a String cannot fail.
                    let _ = write!(r, "{}@P{p}", if j == 0 { "" } else { ", " });
                }
                if self.numbered {
                    let _ = write!(r, ", {i}");
                }
                r.push(')');
            }
            (self.text)(&r)
        }
    }

    /// The stored state of the page's objects, with the run that last saw each. @P1
    /// connector; a row: anchor.
    pub const STORED_OBJECTS: Shape = Shape {
        name: "STORED_OBJECTS",
        shared: 1,
        per_row: 1,
        numbered: false,
        text: |r| {
            format!("SELECT v.anchor, c.object_type, c.attributes_json, c.deleted, c.seen_run FROM (VALUES {r}) v(anchor) JOIN cs_objects c ON c.connector_id = @P1 AND c.anchor = v.anchor")
        },
    };
    /// New and changed objects. A changed one is marked for the composer at a new revision and
    /// undeleted; without @P4 (the batch's `compose`) only a linked object is marked (see
    /// ImportBatch), and with @P5 (the batch composes these rows itself) none is. A new one has
    /// no link (links go with their object's tombstone).
    /// @P1 connector, @P2 now, @P3 the run that saw them, @P4 compose, @P5 composed; a row:
    /// anchor, object type, attributes. Each anchor once: a MERGE may touch a row only once.
    pub const WRITE_OBJECTS: Shape = Shape {
        name: "WRITE_OBJECTS",
        shared: 5,
        per_row: 3,
        numbered: false,
        text: |r| {
            format!("MERGE cs_objects AS c USING (VALUES {r}) AS v(anchor, object_type, attributes_json) ON c.connector_id = @P1 AND c.anchor = v.anchor WHEN MATCHED THEN UPDATE SET object_type = v.object_type, attributes_json = v.attributes_json, updated_at = @P2, dirty = CASE WHEN @P5 = 1 THEN 0 WHEN @P4 = 1 OR EXISTS (SELECT 1 FROM identity_links l WHERE l.connector_id = @P1 AND l.anchor = v.anchor) THEN 1 ELSE 0 END, deleted = 0, seen_run = COALESCE(@P3, c.seen_run), rev = c.rev + 1 WHEN NOT MATCHED THEN INSERT (connector_id, anchor, object_type, attributes_json, updated_at, dirty, deleted, seen_run, rev) VALUES (@P1, v.anchor, v.object_type, v.attributes_json, @P2, CASE WHEN @P5 = 1 THEN 0 ELSE @P4 END, 0, @P3, 1);")
        },
    };
    /// Unchanged objects seen by a full import: only the run that saw them is recorded.
    /// @P1 connector, @P2 run; a row: anchor.
    pub const SEEN_OBJECTS: Shape = Shape {
        name: "SEEN_OBJECTS",
        shared: 2,
        per_row: 1,
        numbered: false,
        text: |r| {
            format!("UPDATE c SET seen_run = @P2 FROM cs_objects c JOIN (VALUES {r}) v(anchor) ON c.connector_id = @P1 AND c.anchor = v.anchor")
        },
    };

    /// The join keys of these identities. A row: identity id.
    pub const DELETE_KEYS: Shape = Shape {
        name: "DELETE_KEYS",
        shared: 0,
        per_row: 1,
        numbered: false,
        text: |r| {
            format!("DELETE k FROM identity_keys k JOIN (VALUES {r}) v(id) ON k.identity_id = v.id")
        },
    };
    /// A row: identity id.
    pub const DELETE_IDENTITIES: Shape = Shape {
        name: "DELETE_IDENTITIES",
        shared: 0,
        per_row: 1,
        numbered: false,
        text: |r| format!("DELETE i FROM identities i JOIN (VALUES {r}) v(id) ON i.id = v.id"),
    };
    /// An identity kept keeps its creation time. A row: id, display name, attributes,
    /// created at, updated at; each id once.
    pub const PUT_IDENTITIES: Shape = Shape {
        name: "PUT_IDENTITIES",
        shared: 0,
        per_row: 5,
        numbered: false,
        text: |r| {
            format!("MERGE identities AS t USING (VALUES {r}) AS v(id, display_name, attributes_json, created_at, updated_at) ON t.id = v.id WHEN MATCHED THEN UPDATE SET display_name = v.display_name, attributes_json = v.attributes_json, updated_at = v.updated_at WHEN NOT MATCHED THEN INSERT (id, display_name, attributes_json, created_at, updated_at) VALUES (v.id, v.display_name, v.attributes_json, v.created_at, v.updated_at);")
        },
    };
    /// Join keys of identities whose keys were just deleted. A key listed twice is written once
    /// (as the server's collation compares them, as one at a time with NOT EXISTS did).
    /// A row: attr, value, identity id.
    pub const INSERT_KEYS: Shape = Shape {
        name: "INSERT_KEYS",
        shared: 0,
        per_row: 3,
        numbered: false,
        text: |r| {
            format!("INSERT INTO identity_keys (attr, value, identity_id) SELECT DISTINCT v.attr, v.value, v.identity_id FROM (VALUES {r}) v(attr, value, identity_id) WHERE NOT EXISTS (SELECT 1 FROM identity_keys k WHERE k.attr = v.attr AND k.value = v.value AND k.identity_id = v.identity_id)")
        },
    };
    /// A row: connector, anchor.
    pub const DELETE_LINKS: Shape = Shape {
        name: "DELETE_LINKS",
        shared: 0,
        per_row: 2,
        numbered: false,
        text: |r| {
            format!("DELETE l FROM identity_links l JOIN (VALUES {r}) v(connector_id, anchor) ON l.connector_id = v.connector_id AND l.anchor = v.anchor")
        },
    };
    /// A row: connector, anchor, identity id, precedence, contribution; each link once.
    pub const PUT_LINKS: Shape = Shape {
        name: "PUT_LINKS",
        shared: 0,
        per_row: 5,
        numbered: false,
        text: |r| {
            format!("MERGE identity_links AS t USING (VALUES {r}) AS v(connector_id, anchor, identity_id, precedence, contribution_json) ON t.connector_id = v.connector_id AND t.anchor = v.anchor WHEN MATCHED THEN UPDATE SET identity_id = v.identity_id, precedence = v.precedence, contribution_json = v.contribution_json WHEN NOT MATCHED THEN INSERT (connector_id, anchor, identity_id, precedence, contribution_json) VALUES (v.connector_id, v.anchor, v.identity_id, v.precedence, v.contribution_json);")
        },
    };
    /// Composed objects: a deleted one at that revision goes, any other loses its mark (only
    /// at the revision the composer read, so a newer import stays marked). Two statements over
    /// the same parameters. A row: connector, anchor, revision.
    pub const COMPOSED: Shape = Shape {
        name: "COMPOSED",
        shared: 0,
        per_row: 3,
        numbered: false,
        text: |r| {
            format!("DELETE o FROM cs_objects o JOIN (VALUES {r}) v(connector_id, anchor, rev) ON o.connector_id = v.connector_id AND o.anchor = v.anchor AND o.rev = v.rev WHERE o.deleted = 1; UPDATE o SET dirty = 0 FROM cs_objects o JOIN (VALUES {r}) v(connector_id, anchor, rev) ON o.connector_id = v.connector_id AND o.anchor = v.anchor AND o.rev = v.rev")
        },
    };
    /// Audit entries, numbered so their sequence follows the order they were written in
    /// (SQL Server assigns identities in the ORDER BY's order). A row: at, actor, action,
    /// target, detail.
    pub const INSERT_AUDITS: Shape = Shape {
        name: "INSERT_AUDITS",
        shared: 0,
        per_row: 5,
        numbered: true,
        text: |r| {
            format!("INSERT INTO audit_log (at, actor, action, target, detail) SELECT v.at, v.actor, v.action, v.target, v.detail FROM (VALUES {r}) v(at, actor, action, target, detail, n) ORDER BY v.n")
        },
    };

    /// The connector's links for these anchors. @P1 connector; a row: anchor.
    pub const LINKS_FOR: Shape = Shape {
        name: "LINKS_FOR",
        shared: 1,
        per_row: 1,
        numbered: false,
        text: |r| {
            format!("SELECT l.connector_id, l.anchor, l.identity_id, l.precedence, l.contribution_json FROM (VALUES {r}) v(anchor) JOIN identity_links l ON l.connector_id = @P1 AND l.anchor = v.anchor")
        },
    };
    /// The identities each join key finds, at most 16 a key as IDENTITIES_BY_KEY.
    /// A row: attr, value.
    pub const IDENTITIES_BY_KEYS: Shape = Shape {
        name: "IDENTITIES_BY_KEYS",
        shared: 0,
        per_row: 2,
        numbered: false,
        text: |r| {
            format!("SELECT v.attr, v.value, k.identity_id FROM (VALUES {r}) v(attr, value) CROSS APPLY (SELECT TOP (16) identity_id FROM identity_keys WHERE attr = v.attr AND value = v.value ORDER BY identity_id) k")
        },
    };
    /// Two result sets over the same parameters: these identities, then all their links in
    /// LINKS_OF_IDENTITY's order. A row: identity id.
    pub const IDENTITIES_WITH_LINKS: Shape = Shape {
        name: "IDENTITIES_WITH_LINKS",
        shared: 0,
        per_row: 1,
        numbered: false,
        text: |r| {
            format!("SELECT i.id, i.display_name, i.attributes_json, i.created_at, i.updated_at FROM (VALUES {r}) v(id) JOIN identities i ON i.id = v.id; SELECT l.connector_id, l.anchor, l.identity_id, l.precedence, l.contribution_json FROM (VALUES {r}) v(id) JOIN identity_links l ON l.identity_id = v.id ORDER BY l.identity_id, l.precedence, l.connector_id")
        },
    };

    /// All of the above, for the syntax and limit tests.
    pub const ALL: &[&Shape] = &[
        &STORED_OBJECTS,
        &WRITE_OBJECTS,
        &SEEN_OBJECTS,
        &DELETE_KEYS,
        &DELETE_IDENTITIES,
        &PUT_IDENTITIES,
        &INSERT_KEYS,
        &DELETE_LINKS,
        &PUT_LINKS,
        &COMPOSED,
        &INSERT_AUDITS,
        &LINKS_FOR,
        &IDENTITIES_BY_KEYS,
        &IDENTITIES_WITH_LINKS,
    ];
}

/// The statements that send `items` in `shape`, each carrying as many rows as one statement
/// may: the text and its parameters (the shared ones, then each item's, which `row` appends).
fn chunked<'a, T>(
    shape: &multi::Shape,
    shared: &[&'a dyn ToSql],
    items: &'a [T],
    row: impl Fn(&'a T, &mut Vec<&'a dyn ToSql>),
) -> Vec<(String, Vec<&'a dyn ToSql>)> {
    items
        .chunks(shape.max_rows())
        .map(|chunk| {
            let mut params = Vec::with_capacity(shape.params(chunk.len()));
            params.extend_from_slice(shared);
            for item in chunk {
                row(item, &mut params);
            }
            debug_assert_eq!(params.len(), shape.params(chunk.len()), "{}", shape.name);
            (shape.sql(chunk.len()), params)
        })
        .collect()
}

/// One request to the server and its answer. The transaction bodies of the batched paths send
/// through it, so a test can count and read their round trips without a server.
#[async_trait]
trait Wire: Send {
    /// Every result set of the request, in order.
    async fn fetch(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Row>>, StoreError>;
    /// The rows the request's statements affected, summed.
    async fn run(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError>;
}

#[async_trait]
impl Wire for Conn {
    async fn fetch(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Row>>, StoreError> {
        self.query(q, params)
            .await
            .map_err(backend_err)?
            .into_results()
            .await
            .map_err(backend_err)
    }

    async fn run(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError> {
        Ok(self.execute(q, params).await.map_err(backend_err)?.total())
    }
}

/// How long any statement waits for a lock (`SET LOCK_TIMEOUT` on every session). Without a
/// bound, a promotion waits behind a hung or cut-off active's fenced transaction for as long
/// as SQL Server keeps that session (until TCP keep-alive ends it); with it, the promotion
/// fails with a retryable error and the operator tries again.
pub const LOCK_WAIT_MS: u64 = 10_000;

/// SQL Server's "lock request time out period exceeded".
const LOCK_TIMEOUT_ERROR: u32 = 1222;

fn backend_err(e: tiberius::error::Error) -> StoreError {
    match e {
        tiberius::error::Error::Io { .. } | tiberius::error::Error::Routing { .. } => {
            StoreError::Unavailable(e.to_string())
        }
        tiberius::error::Error::Server(t) if t.code() == LOCK_TIMEOUT_ERROR => {
            StoreError::Unavailable(lock_wait_exceeded())
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn lock_wait_exceeded() -> String {
    format!(
        "waited {} s for a database lock another transaction holds (a hung or cut-off \
         instance's, until SQL Server ends its session); retry",
        LOCK_WAIT_MS / 1000
    )
}

/// `sp_getapplock`'s return value: 0 or 1 granted; -1 timeout, -2 cancelled, -3 deadlock
/// victim, -999 a parameter or call error.
fn applock_granted(code: i32) -> Result<(), StoreError> {
    if code >= 0 {
        return Ok(());
    }
    let why = match code {
        -1 => "timed out after 60 s (another instance is migrating; start again)",
        -2 => "was cancelled",
        -3 => "was chosen as a deadlock victim (start again)",
        _ => "failed (a call or parameter error)",
    };
    Err(StoreError::Migration(format!(
        "the schema migration lock (sp_getapplock, result {code}) {why}"
    )))
}

pub struct MssqlStore {
    config: Config,
    /// Idle connections; a connection is taken for a whole transaction and returned after it.
    idle: Mutex<Vec<Conn>>,
}

impl MssqlStore {
    pub async fn connect(connection_string: &str) -> Result<Self, StoreError> {
        let config = Config::from_ado_string(connection_string).map_err(|e| {
            StoreError::Config(format!(
                "{e}; expected the ADO.NET form used for ConnectionStrings:IdentityMesh"
            ))
        })?;
        let store = Self {
            config,
            idle: Mutex::new(Vec::new()),
        };
        // Fail at start, with the server's own message, when the database cannot be reached.
        let conn = store.take().await?;
        store.give(conn);
        Ok(store)
    }

    async fn take(&self) -> Result<Conn, StoreError> {
        if let Some(c) = self.idle.lock().map_err(|_| poisoned())?.pop() {
            return Ok(c);
        }
        let tcp = TcpStream::connect(self.config.get_addr())
            .await
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.config.get_addr())))?;
        tcp.set_nodelay(true)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut conn = Client::connect(self.config.clone(), tcp.compat_write())
            .await
            .map_err(backend_err)?;
        conn.simple_query(sql::SESSION_SETUP)
            .await
            .map_err(backend_err)?;
        Ok(conn)
    }

    fn give(&self, conn: Conn) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < 8 {
                idle.push(conn);
            }
        }
    }

    /// Ends a transaction: commit on success, roll back on error. A connection whose rollback
    /// fails is dropped rather than reused in an unknown state.
    async fn finish<T>(
        &self,
        mut conn: Conn,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(v) => {
                conn.simple_query(sql::COMMIT).await.map_err(backend_err)?;
                self.give(conn);
                Ok(v)
            }
            Err(e) => {
                if conn.simple_query(sql::ROLLBACK).await.is_ok() {
                    self.give(conn);
                }
                Err(e)
            }
        }
    }

    async fn begin(&self) -> Result<Conn, StoreError> {
        let mut conn = self.take().await?;
        conn.simple_query(sql::BEGIN).await.map_err(backend_err)?;
        Ok(conn)
    }

    /// The request's first result set.
    async fn rows(
        w: &mut dyn Wire,
        q: &str,
        params: &[&dyn ToSql],
    ) -> Result<Vec<Row>, StoreError> {
        Ok(w.fetch(q, params)
            .await?
            .into_iter()
            .next()
            .unwrap_or_default())
    }

    /// Appends to the ordered journal of fenced commits, inside the commit's transaction.
    async fn journal(
        w: &mut dyn Wire,
        kind: &str,
        epoch: i64,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        Self::exec(w, sql::JOURNAL, &[&kind, &epoch, &instance, &now_ms]).await?;
        Ok(())
    }

    async fn exec(w: &mut dyn Wire, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError> {
        w.run(q, params).await
    }

    /// UPDATE, then INSERT when no row matched; only called inside a transaction holding the
    /// fence lock, or with an UPDATE that takes a key-range lock (`WITH (UPDLOCK, SERIALIZABLE)`).
    async fn upsert(
        w: &mut dyn Wire,
        update: &str,
        insert: &str,
        params: &[&dyn ToSql],
    ) -> Result<(), StoreError> {
        if Self::exec(w, update, params).await? == 0 {
            Self::exec(w, insert, params).await?;
        }
        Ok(())
    }

    async fn fence_locked(w: &mut dyn Wire) -> Result<Fence, StoreError> {
        let rows = Self::rows(w, sql::FENCE_LOCKED, &[]).await?;
        fence_from(rows.first())
    }

    async fn check_fence(w: &mut dyn Wire, token: &FenceToken) -> Result<(), StoreError> {
        fencing::check(&Self::fence_locked(w).await?, token)
    }

    /// `commit_import_batch` inside its transaction: the fence check, the stored state of the
    /// page's objects, the new and changed ones in one MERGE per statement's worth, the
    /// unchanged ones a full import saw, then the batch record and the journal entry.
    async fn import_page(
        w: &mut dyn Wire,
        token: &FenceToken,
        batch: &ImportBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        Self::check_fence(w, token).await?;
        let mut out = BatchOutcome::default();
        for round in rounds(&batch.objects) {
            // A later round compares with what the earlier ones wrote.
            let anchors: Vec<&String> = round.iter().map(|o| &o.anchor).collect();
            let stored = Self::stored_objects_on(w, &batch.connector, &anchors).await?;
            let (mut writes, mut unchanged) = (Vec::new(), Vec::new());
            for o in round {
                let s = stored.get(&o.anchor);
                // Seen by this run already: in an earlier batch, or in an earlier round of
                // this one, whose writes the read above sees (see `BatchOutcome::duplicates`).
                if StoredObject::seen_by(s, batch.seen_in_run.as_ref()) {
                    out.duplicates.push(o.anchor.clone());
                    continue;
                }
                if !StoredObject::changed_by(s, o) {
                    out.unchanged += 1;
                    unchanged.push(o);
                    continue;
                }
                if s.is_some() {
                    out.updated += 1;
                } else {
                    out.added += 1;
                }
                writes.push(o);
            }
            Self::write_round(w, batch, &writes, &unchanged, now_ms).await?;
        }
        if let Some(page) = &batch.composed {
            for (q, p) in ComposeRows::of(&page.writes).statements() {
                Self::exec(w, &q, &p).await?;
            }
        }
        let count = batch.objects.len() as i32;
        let rows = Self::rows(
            w,
            sql::IMPORT_TAIL,
            &[
                &batch.connector.as_str(),
                &batch.object_type.as_str(),
                &count,
                &batch.watermark.as_deref(),
                &token.epoch,
                &token.instance.as_str(),
                &now_ms,
            ],
        )
        .await?;
        let seq: i64 = col(
            rows.first()
                .ok_or_else(|| StoreError::Backend("no batch sequence returned".into()))?,
            0,
        )?;
        out.seq = seq as u64;
        Ok(out)
    }

    /// Writes a round's new and changed objects, and records the unchanged ones as seen by a
    /// full import.
    async fn write_round(
        w: &mut dyn Wire,
        batch: &ImportBatch,
        writes: &[&CsObject],
        unchanged: &[&CsObject],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // Objects the batch composes itself, and the rest: the two differ only in the mark.
        let (composed, marked): (Vec<&CsObject>, Vec<&CsObject>) = writes
            .iter()
            .partition(|o| PageCompose::covers(&batch.composed, &o.anchor));
        for (group, composed) in [(marked, false), (composed, true)] {
            let shared: [&dyn ToSql; 5] = [
                &batch.connector,
                &now_ms,
                &batch.seen_in_run,
                &batch.compose,
                &composed,
            ];
            for (q, p) in chunked(&multi::WRITE_OBJECTS, &shared, &group, |o, p| {
                p.extend([&o.anchor as &dyn ToSql, &o.object_type, &o.attributes_json])
            }) {
                Self::exec(w, &q, &p).await?;
            }
        }
        if let Some(run) = &batch.seen_in_run {
            let shared: [&dyn ToSql; 2] = [&batch.connector, run];
            for (q, p) in chunked(&multi::SEEN_OBJECTS, &shared, unchanged, |o, p| {
                p.push(&o.anchor)
            }) {
                Self::exec(w, &q, &p).await?;
            }
        }
        Ok(())
    }

    /// The stored state of those of the objects that exist, by their anchor as the page spells
    /// it (the match is the server's collation's, as one object at a time).
    async fn stored_objects_on(
        w: &mut dyn Wire,
        connector: &str,
        anchors: &[&String],
    ) -> Result<HashMap<String, StoredObject>, StoreError> {
        let mut stored = HashMap::new();
        let shared: [&dyn ToSql; 1] = [&connector];
        for (q, p) in chunked(&multi::STORED_OBJECTS, &shared, anchors, |a, p| p.push(*a)) {
            for r in Self::rows(w, &q, &p).await? {
                let s = StoredObject {
                    object_type: text(&r, 1)?,
                    attributes_json: text(&r, 2)?,
                    deleted: col(&r, 3)?,
                    seen_run: opt::<&str>(&r, 4)?.map(str::to_string),
                };
                stored.insert(text(&r, 0)?, s);
            }
        }
        Ok(stored)
    }

    /// `commit_compose` inside its transaction: the fence check, the end state of the writes
    /// in a few multi-row statements, then the journal entry.
    async fn compose_chunk(
        w: &mut dyn Wire,
        token: &FenceToken,
        writes: &[ComposeWrite],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        Self::check_fence(w, token).await?;
        for (q, p) in ComposeRows::of(writes).statements() {
            Self::exec(w, &q, &p).await?;
        }
        Self::journal(w, "compose", token.epoch, &token.instance, now_ms).await
    }

    async fn links_for_on(
        w: &mut dyn Wire,
        connector: &str,
        anchors: &[String],
    ) -> Result<Vec<LinkRow>, StoreError> {
        let mut out = Vec::new();
        let shared: [&dyn ToSql; 1] = [&connector];
        for (q, p) in chunked(&multi::LINKS_FOR, &shared, anchors, |a, p| p.push(a)) {
            for r in Self::rows(w, &q, &p).await? {
                out.push(link_row(&r)?);
            }
        }
        Ok(out)
    }

    async fn identities_by_keys_on(
        w: &mut dyn Wire,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut out = Vec::new();
        for (q, p) in chunked(&multi::IDENTITIES_BY_KEYS, &[], keys, |(a, v), p| {
            p.extend([a as &dyn ToSql, v])
        }) {
            for r in Self::rows(w, &q, &p).await? {
                out.push((text(&r, 0)?, text(&r, 1)?, text(&r, 2)?));
            }
        }
        Ok(out)
    }

    async fn identities_with_links_on(
        w: &mut dyn Wire,
        ids: &[String],
    ) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
        let (mut rows, mut links) = (Vec::new(), Vec::new());
        for (q, p) in chunked(&multi::IDENTITIES_WITH_LINKS, &[], ids, |id, p| p.push(id)) {
            let mut sets = w.fetch(&q, &p).await?.into_iter();
            for r in sets.next().unwrap_or_default() {
                rows.push(identity_row(&r)?);
            }
            for r in sets.next().unwrap_or_default() {
                links.push(link_row(&r)?);
            }
        }
        Ok((rows, links))
    }

    /// Gives a read's connection back to the pool once the read succeeded.
    fn kept<T>(&self, conn: Conn, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_ok() {
            self.give(conn);
        }
        r
    }

    async fn read<T>(
        &self,
        q: &str,
        params: &[&dyn ToSql],
        map: impl Fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut conn = self.take().await?;
        let rows = Self::rows(&mut conn, q, params).await?;
        self.give(conn);
        rows.iter().map(map).collect()
    }
}

fn poisoned() -> StoreError {
    StoreError::Backend("connection pool lock poisoned".into())
}

/// An object's stored state, as an import compares it.
/// The page's objects in rounds of distinct anchors, in page order: an anchor the page holds
/// twice is written again in the next round, as writing one object at a time did (a MERGE may
/// touch a row only once). Anchors that differ only in case count as one, as they do under
/// SQL Server's default, case-insensitive collation.
fn rounds(objects: &[CsObject]) -> Vec<Vec<&CsObject>> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut rounds: Vec<Vec<&CsObject>> = Vec::new();
    for o in objects {
        let n = seen.entry(o.anchor.to_lowercase()).or_insert(0);
        if rounds.len() == *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(o);
        *n += 1;
    }
    rounds
}

/// An identity as a compose commit leaves it: the last put's values, with the creation time
/// of the put that would have inserted it (the first one since it was last deleted; a kept
/// row keeps its own).
struct IdentityPut<'a> {
    row: &'a IdentityRow,
    created_at_ms: &'a i64,
}

/// What a compose commit's writes leave behind, applied in order: the same end state as
/// writing them one at a time, as rows for the multi-row statements.
#[derive(Default)]
struct ComposeRows<'a> {
    /// Every identity a write touched: its join keys are replaced.
    touched: Vec<&'a str>,
    /// Deleted, or deleted and put again (then inserted anew, as one by one).
    deleted: Vec<&'a str>,
    puts: Vec<IdentityPut<'a>>,
    keys: Vec<(&'a str, &'a str, &'a str)>,
    links_deleted: Vec<(&'a str, &'a str)>,
    links_put: Vec<&'a LinkRow>,
    composed: Vec<(&'a str, &'a str, &'a i64)>,
    audits: Vec<&'a AuditEntry>,
}

type IdentityEnd<'a> = (Option<(IdentityPut<'a>, &'a [(String, String)])>, bool);

impl<'a> ComposeRows<'a> {
    fn of(writes: &'a [ComposeWrite]) -> Self {
        let mut rows = ComposeRows::default();
        // Per identity: its last put with its keys, and whether a delete came before it.
        let mut identities: HashMap<&str, IdentityEnd<'a>> = HashMap::new();
        let mut links: HashMap<(&str, &str), Option<&LinkRow>> = HashMap::new();
        let mut link_order = Vec::new();
        for w in writes {
            match w {
                ComposeWrite::PutIdentity { identity, keys } => {
                    let end = identities.entry(&identity.id).or_insert_with(|| {
                        rows.touched.push(&identity.id);
                        (None, false)
                    });
                    let created_at_ms = match &end.0 {
                        Some((earlier, _)) => earlier.created_at_ms,
                        None => &identity.created_at_ms,
                    };
                    let put = IdentityPut {
                        row: identity,
                        created_at_ms,
                    };
                    end.0 = Some((put, keys));
                }
                ComposeWrite::DeleteIdentity { id } => {
                    let end = identities.entry(id).or_insert_with(|| {
                        rows.touched.push(id);
                        (None, false)
                    });
                    *end = (None, true);
                }
                ComposeWrite::PutLink(l) => {
                    let k = (l.connector_id.as_str(), l.anchor.as_str());
                    if links.insert(k, Some(l)).is_none() {
                        link_order.push(k);
                    }
                }
                ComposeWrite::DeleteLink {
                    connector_id,
                    anchor,
                } => {
                    let k = (connector_id.as_str(), anchor.as_str());
                    if links.insert(k, None).is_none() {
                        link_order.push(k);
                    }
                }
                ComposeWrite::Composed {
                    connector_id,
                    anchor,
                    rev,
                } => rows.composed.push((connector_id, anchor, rev)),
                ComposeWrite::Audit(e) => rows.audits.push(e),
            }
        }
        for id in &rows.touched {
            let Some((put, deleted)) = identities.remove(id) else {
                continue;
            };
            if deleted {
                rows.deleted.push(id);
            }
            if let Some((put, keys)) = put {
                let mut seen = HashSet::new();
                for (attr, value) in keys {
                    if seen.insert((attr, value)) {
                        rows.keys.push((attr, value, &put.row.id));
                    }
                }
                rows.puts.push(put);
            }
        }
        for k in link_order {
            match links.get(&k).copied().flatten() {
                Some(l) => rows.links_put.push(l),
                None => rows.links_deleted.push(k),
            }
        }
        rows
    }

    /// The statements, in the order their effects depend on: keys go before they are written
    /// again, a deleted identity before it is inserted anew.
    fn statements(&self) -> Vec<(String, Vec<&dyn ToSql>)> {
        let mut out = chunked(&multi::DELETE_KEYS, &[], &self.touched, |id, p| p.push(id));
        out.extend(chunked(
            &multi::DELETE_IDENTITIES,
            &[],
            &self.deleted,
            |id, p| p.push(id),
        ));
        out.extend(chunked(&multi::PUT_IDENTITIES, &[], &self.puts, |i, p| {
            p.extend([
                &i.row.id as &dyn ToSql,
                &i.row.display_name,
                &i.row.attributes_json,
                i.created_at_ms,
                &i.row.updated_at_ms,
            ])
        }));
        out.extend(chunked(
            &multi::INSERT_KEYS,
            &[],
            &self.keys,
            |(a, v, id), p| p.extend([a as &dyn ToSql, v, id]),
        ));
        out.extend(chunked(
            &multi::DELETE_LINKS,
            &[],
            &self.links_deleted,
            |(c, a), p| p.extend([c as &dyn ToSql, a]),
        ));
        out.extend(chunked(&multi::PUT_LINKS, &[], &self.links_put, |l, p| {
            p.extend([
                &l.connector_id as &dyn ToSql,
                &l.anchor,
                &l.identity_id,
                &l.precedence,
                &l.contribution_json,
            ])
        }));
        out.extend(chunked(
            &multi::COMPOSED,
            &[],
            &self.composed,
            |(c, a, rev), p| p.extend([c as &dyn ToSql, a, *rev]),
        ));
        out.extend(chunked(&multi::INSERT_AUDITS, &[], &self.audits, |e, p| {
            p.extend([
                &e.at_ms as &dyn ToSql,
                &e.actor,
                &e.action,
                &e.target,
                &e.detail,
            ])
        }));
        out
    }
}

fn col<'a, T: tiberius::FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, StoreError> {
    row.try_get::<T, _>(i)
        .map_err(backend_err)?
        .ok_or_else(|| StoreError::Backend(format!("unexpected NULL in column {i}")))
}

fn text(row: &Row, i: usize) -> Result<String, StoreError> {
    col::<&str>(row, i).map(str::to_string)
}

fn opt<'a, T: tiberius::FromSql<'a>>(row: &'a Row, i: usize) -> Result<Option<T>, StoreError> {
    row.try_get::<T, _>(i).map_err(backend_err)
}

fn relay_row(r: &Row) -> Result<RelayRow, StoreError> {
    Ok(RelayRow {
        id: text(r, 0)?,
        name: text(r, 1)?,
        created_at_ms: col(r, 2)?,
        revoked_at_ms: opt(r, 3)?,
        last_seen_ms: opt(r, 4)?,
        version: opt::<&str>(r, 5)?.map(str::to_string),
        connected_instance: opt::<&str>(r, 6)?.map(str::to_string),
        connected_since_ms: opt(r, 7)?,
    })
}

/// SQL Server error 2627 (unique constraint) or 2601 (unique index), as tiberius reports them.
fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(m) if m.contains("(code: 2627,") || m.contains("(code: 2601,"))
}

/// A LIKE pattern matching `q` as a literal substring: `\`, `%`, `_` and T-SQL's `[` are
/// escaped with the backslash the statement names in `ESCAPE '\'`.
fn like_pattern(q: &str) -> String {
    format!("%{}", like_prefix(q))
}

/// A LIKE pattern matching what starts with `q`, escaped as [`like_pattern`]'s.
fn like_prefix(q: &str) -> String {
    let mut p = String::with_capacity(q.len() + 2);
    for ch in q.chars() {
        if matches!(ch, '\\' | '%' | '_' | '[') {
            p.push('\\');
        }
        p.push(ch);
    }
    p.push('%');
    p
}

fn connector_row(r: &Row) -> Result<ConnectorRow, StoreError> {
    Ok(ConnectorRow {
        id: text(r, 0)?,
        name: text(r, 1)?,
        kind: text(r, 2)?,
        config_json: text(r, 3)?,
        rules_json: text(r, 4)?,
        relay_id: opt::<&str>(r, 5)?.map(str::to_string),
        is_canary: col(r, 6)?,
        created_at_ms: col(r, 7)?,
        updated_at_ms: col(r, 8)?,
    })
}

/// The counters are INT columns, read as i32.
fn run_row(r: &Row) -> Result<RunRow, StoreError> {
    Ok(RunRow {
        id: text(r, 0)?,
        connector_id: text(r, 1)?,
        instance: text(r, 2)?,
        epoch: col(r, 3)?,
        mode: text(r, 4)?,
        trigger: text(r, 5)?,
        status: text(r, 6)?,
        started_at_ms: col(r, 7)?,
        finished_at_ms: opt(r, 8)?,
        added: col::<i32>(r, 9)?.into(),
        updated: col::<i32>(r, 10)?.into(),
        unchanged: col::<i32>(r, 11)?.into(),
        deleted: col::<i32>(r, 12)?.into(),
        failed: col::<i32>(r, 13)?.into(),
        error: opt::<&str>(r, 14)?.map(str::to_string),
        errors_json: opt::<&str>(r, 15)?.map(str::to_string),
    })
}

fn link_row(r: &Row) -> Result<LinkRow, StoreError> {
    Ok(LinkRow {
        connector_id: text(r, 0)?,
        anchor: text(r, 1)?,
        identity_id: text(r, 2)?,
        precedence: col::<i32>(r, 3)?.into(),
        contribution_json: text(r, 4)?,
    })
}

fn identity_row(r: &Row) -> Result<IdentityRow, StoreError> {
    Ok(IdentityRow {
        id: text(r, 0)?,
        display_name: text(r, 1)?,
        attributes_json: text(r, 2)?,
        created_at_ms: col(r, 3)?,
        updated_at_ms: col(r, 4)?,
    })
}

fn fence_from(row: Option<&Row>) -> Result<Fence, StoreError> {
    let row = row.ok_or_else(|| StoreError::Backend("the fence row is missing".into()))?;
    Ok(Fence {
        epoch: col(row, 0)?,
        holder: text(row, 1)?,
        holder_incarnation: text(row, 2)?,
    })
}

#[async_trait]
impl Store for MssqlStore {
    fn backend(&self) -> &'static str {
        "sqlserver"
    }

    async fn migrate(&self) -> Result<Vec<u32>, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            let granted: i32 = col(
                Self::rows(&mut conn, sql::MIGRATION_LOCK, &[])
                    .await?
                    .first()
                    .ok_or_else(|| StoreError::Migration("no result from sp_getapplock".into()))?,
                0,
            )?;
            applock_granted(granted)?;
            let exists: i32 = col(
                Self::rows(&mut conn, sql::MIGRATIONS_TABLE_EXISTS, &[])
                    .await?
                    .first()
                    .ok_or_else(|| StoreError::Migration("no result from sys.tables".into()))?,
                0,
            )?;
            if exists == 0 {
                Self::exec(&mut conn, sql::CREATE_MIGRATIONS_TABLE, &[]).await?;
            }
            let applied: Vec<i32> = Self::rows(&mut conn, sql::APPLIED_MIGRATIONS, &[])
                .await?
                .iter()
                .map(|r| col(r, 0))
                .collect::<Result<_, _>>()?;
            let mut done = Vec::new();
            for m in MSSQL
                .iter()
                .filter(|m| !applied.contains(&(m.version as i32)))
            {
                for stmt in m.statements {
                    Self::exec(&mut conn, stmt, &[]).await.map_err(|e| {
                        StoreError::Migration(format!("version {} ({}): {e}", m.version, m.name))
                    })?;
                }
                Self::exec(
                    &mut conn,
                    sql::RECORD_MIGRATION,
                    &[&(m.version as i32), &m.name, &now_ms()],
                )
                .await?;
                done.push(m.version);
            }
            Ok(done)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(sql::PING, &[], |_| Ok(())).await.map(|_| ())
    }

    async fn fence(&self) -> Result<Fence, StoreError> {
        let mut conn = self.take().await?;
        let rows = Self::rows(&mut conn, sql::FENCE, &[]).await?;
        self.give(conn);
        fence_from(rows.first())
    }

    async fn promote(&self, claim: &FenceToken) -> Result<PromoteOutcome, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            let fence = Self::fence_locked(&mut conn).await?;
            let outcome = fencing::promote(&fence, claim)?;
            if outcome == PromoteOutcome::AlreadyHeld {
                return Ok(outcome);
            }
            let now = now_ms();
            let (instance, incarnation) = (claim.instance.as_str(), claim.incarnation.as_str());
            Self::exec(
                &mut conn,
                sql::SET_FENCE,
                &[&claim.epoch, &instance, &incarnation, &now],
            )
            .await?;
            Self::exec(
                &mut conn,
                sql::FENCE_OTHER_ACTIVES,
                &[&instance, &incarnation],
            )
            .await?;
            Self::journal(&mut conn, "promote", claim.epoch, instance, now).await?;
            Ok(outcome)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn heartbeat(&self, hb: &Heartbeat) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            let fence = Self::fence_locked(&mut conn).await?;
            let role = fencing::heartbeat_role(&fence, hb);
            let stale = role != hb.role;
            Self::upsert(
                &mut conn,
                sql::UPDATE_INSTANCE,
                sql::INSERT_INSTANCE,
                &[
                    &hb.instance.as_str(),
                    &hb.host.as_str(),
                    &role.as_str(),
                    &hb.epoch,
                    &hb.version.as_str(),
                    &hb.started_at_ms,
                    &hb.now_ms,
                    &hb.incarnation.as_str(),
                ],
            )
            .await?;
            Ok((stale, fence))
        }
        .await;
        let (stale, fence) = self.finish(conn, r).await?;
        if stale {
            return Err(StoreError::Fenced {
                stored: fence.epoch,
                holder: fence.holder_label(),
                own: hb.epoch,
            });
        }
        Ok(())
    }

    async fn instances(&self, alive_since_ms: i64) -> Result<Vec<InstanceRow>, StoreError> {
        self.read(sql::INSTANCES, &[&alive_since_ms], |r| {
            Ok(InstanceRow {
                instance: text(r, 0)?,
                host: text(r, 1)?,
                role: Role::parse(&text(r, 2)?),
                epoch: col(r, 3)?,
                version: text(r, 4)?,
                started_at_ms: col(r, 5)?,
                last_heartbeat_ms: col(r, 6)?,
                incarnation: text(r, 7)?,
            })
        })
        .await
    }

    async fn engine_tick(&self, token: &FenceToken, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::upsert(
                &mut conn,
                sql::UPDATE_ENGINE_STATE,
                sql::INSERT_ENGINE_STATE,
                &[&token.instance.as_str(), &token.epoch, &now_ms],
            )
            .await
        }
        .await;
        self.finish(conn, r).await
    }

    async fn commit_import_batch(
        &self,
        token: &FenceToken,
        batch: &ImportBatch,
        now_ms: i64,
    ) -> Result<BatchOutcome, StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::import_page(&mut conn, token, batch, now_ms).await;
        self.finish(conn, r).await
    }

    async fn watermark(
        &self,
        connector: &str,
        object_type: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(sql::WATERMARK, &[&connector, &object_type], |r| text(r, 0))
            .await?
            .into_iter()
            .next())
    }

    async fn count_objects(&self, connector: &str) -> Result<i64, StoreError> {
        let v = self
            .read(sql::COUNT_OBJECTS, &[&connector], |r| col(r, 0))
            .await?;
        Ok(v.into_iter().next().unwrap_or(0))
    }

    async fn count_batches(&self, connector: &str) -> Result<i64, StoreError> {
        let v = self
            .read(sql::COUNT_BATCHES, &[&connector], |r| col(r, 0))
            .await?;
        Ok(v.into_iter().next().unwrap_or(0))
    }

    async fn set_token_hash(&self, name: &str, hash: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            if Self::exec(&mut conn, sql::UPDATE_TOKEN, &[&name, &hash]).await? == 0 {
                Self::exec(&mut conn, sql::INSERT_TOKEN, &[&name, &hash, &now_ms]).await?;
            }
            Ok(())
        }
        .await;
        self.finish(conn, r).await
    }

    async fn token_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(sql::TOKEN, &[&name], |r| text(r, 0))
            .await?
            .into_iter()
            .next())
    }

    async fn create_relay(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        let r = Self::exec(
            &mut conn,
            sql::INSERT_RELAY,
            &[&id, &name, &token_hash, &now_ms],
        )
        .await;
        self.give(conn);
        match r {
            // 2627/2601: unique constraint or index violation.
            Err(StoreError::Backend(m))
                if m.contains("2627") || m.contains("2601") || m.contains("UNIQUE") =>
            {
                Err(StoreError::Conflict(format!(
                    "a relay named `{name}` already exists; pick another name or revoke it first"
                )))
            }
            other => other.map(|_| ()),
        }
    }

    async fn relay_by_token_hash(&self, token_hash: &str) -> Result<Option<RelayRow>, StoreError> {
        Ok(self
            .read(sql::RELAY_BY_HASH, &[&token_hash], relay_row)
            .await?
            .into_iter()
            .next())
    }

    async fn revoke_relay(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let mut conn = self.take().await?;
        let n = Self::exec(&mut conn, sql::REVOKE_RELAY, &[&id, &now_ms]).await?;
        self.give(conn);
        Ok(n > 0)
    }

    async fn relay_connected(
        &self,
        id: &str,
        instance: &str,
        version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::RELAY_CONNECTED,
            &[&id, &instance, &version, &now_ms],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn relay_seen(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(&mut conn, sql::RELAY_SEEN, &[&id, &now_ms]).await?;
        self.give(conn);
        Ok(())
    }

    async fn relay_disconnected(
        &self,
        id: &str,
        instance: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::RELAY_DISCONNECTED,
            &[&id, &instance, &now_ms],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        self.read(sql::RELAYS, &[], relay_row).await
    }

    async fn finish_full_import(
        &self,
        token: &FenceToken,
        connector: &str,
        object_type: &str,
        run_id: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            let n = Self::exec(
                &mut conn,
                sql::MARK_UNSEEN_DELETED,
                &[&now_ms, &connector, &object_type, &run_id],
            )
            .await?;
            Self::journal(
                &mut conn,
                "full_import_end",
                token.epoch,
                &token.instance,
                now_ms,
            )
            .await?;
            Ok(n)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn put_connector(&self, c: &ConnectorRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_CONNECTOR,
            sql::INSERT_CONNECTOR,
            &[
                &c.id.as_str(),
                &c.name.as_str(),
                &c.kind.as_str(),
                &c.config_json.as_str(),
                &c.rules_json.as_str(),
                &c.relay_id.as_deref(),
                &c.is_canary,
                &c.created_at_ms,
                &c.updated_at_ms,
            ],
        )
        .await;
        match self.finish(conn, r).await {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a connector named {:?} already exists; pick another name",
                c.name
            ))),
            other => other,
        }
    }

    async fn connector(&self, id: &str) -> Result<Option<ConnectorRow>, StoreError> {
        Ok(self
            .read(sql::CONNECTOR, &[&id], connector_row)
            .await?
            .into_iter()
            .next())
    }

    async fn connectors(&self) -> Result<Vec<ConnectorRow>, StoreError> {
        self.read(sql::CONNECTORS, &[], connector_row).await
    }

    async fn delete_connector(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            // Every write of the connector space is fenced: holding the fence row's lock (as
            // SQLite's write lock does) keeps the count true until this transaction ends.
            Self::fence_locked(&mut conn).await?;
            let objects: i64 = match Self::rows(&mut conn, sql::CONNECTOR_OBJECTS, &[&id])
                .await?
                .first()
            {
                Some(r) => col(r, 0)?,
                None => 0,
            };
            if objects > 0 {
                return Err(StoreError::Conflict(format!(
                    "connector {id} still has {objects} objects in its connector space; clear it first \
                     (POST /api/connectors/{id}/clear) so its identity contributions are removed"
                )));
            }
            let running = Self::rows(&mut conn, sql::CURRENT_EPOCH_RUN, &[&id])
                .await?
                .first()
                .map(|r| text(r, 0))
                .transpose()?;
            if let Some(run) = running {
                return Err(StoreError::Conflict(running_conflict(id, &run)));
            }
            Self::exec(&mut conn, sql::DELETE_CONNECTOR_SCHEDULES, &[&id]).await?;
            Self::exec(&mut conn, sql::DELETE_CONNECTOR_WATERMARKS, &[&id]).await?;
            Self::exec(&mut conn, sql::DELETE_CONNECTOR, &[&id]).await
        }
        .await;
        Ok(self.finish(conn, r).await? > 0)
    }

    async fn object_types_of(&self, connector: &str) -> Result<Vec<String>, StoreError> {
        self.read(sql::OBJECT_TYPES_OF, &[&connector], |r| text(r, 0))
            .await
    }

    async fn put_schedule(&self, s: &ScheduleRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_SCHEDULE,
            sql::INSERT_SCHEDULE,
            &[
                &s.id.as_str(),
                &s.connector_id.as_str(),
                &s.kind.as_str(),
                &s.spec.as_str(),
                &s.mode.as_str(),
                &s.enabled,
                &s.next_run_ms,
                &s.created_at_ms,
            ],
        )
        .await;
        self.finish(conn, r).await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.read(sql::SCHEDULES, &[], |r| {
            Ok(ScheduleRow {
                id: text(r, 0)?,
                connector_id: text(r, 1)?,
                kind: text(r, 2)?,
                spec: text(r, 3)?,
                mode: text(r, 4)?,
                enabled: col(r, 5)?,
                next_run_ms: opt(r, 6)?,
                created_at_ms: col(r, 7)?,
            })
        })
        .await
    }

    async fn delete_schedule(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.take().await?;
        let n = Self::exec(&mut conn, sql::DELETE_SCHEDULE, &[&id]).await?;
        self.give(conn);
        Ok(n > 0)
    }

    async fn set_schedule_next_run(
        &self,
        token: &FenceToken,
        id: &str,
        next_run_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::exec(&mut conn, sql::SET_SCHEDULE_NEXT_RUN, &[&id, &next_run_ms]).await?;
            Ok(())
        }
        .await;
        self.finish(conn, r).await
    }

    async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(sql::SETTING, &[&name], |r| text(r, 0))
            .await?
            .into_iter()
            .next())
    }

    async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_SETTING,
            sql::INSERT_SETTING,
            &[&name, &value],
        )
        .await;
        self.finish(conn, r).await
    }

    async fn prune(
        &self,
        token: &FenceToken,
        table: RetainedTable,
        before_ms: i64,
        limit: i64,
    ) -> Result<u64, StoreError> {
        let q = match table {
            RetainedTable::Runs => sql::PRUNE_RUNS,
            RetainedTable::AuditLog => sql::PRUNE_AUDIT,
            RetainedTable::ImportBatches => sql::PRUNE_BATCHES,
            RetainedTable::FenceJournal => sql::PRUNE_JOURNAL,
        };
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::exec(&mut conn, q, &[&before_ms, &limit]).await
        }
        .await;
        self.finish(conn, r).await
    }

    async fn set_engine_setting(
        &self,
        token: &FenceToken,
        name: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::upsert(
                &mut conn,
                sql::UPDATE_SETTING,
                sql::INSERT_SETTING,
                &[&name, &value],
            )
            .await
        }
        .await;
        self.finish(conn, r).await
    }

    async fn put_secret(&self, s: &SecretRow) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::upsert(
            &mut conn,
            sql::UPDATE_SECRET,
            sql::INSERT_SECRET,
            &[
                &s.name.as_str(),
                &s.key_id.as_str(),
                &s.nonce.as_slice(),
                &s.ciphertext.as_slice(),
                &s.updated_at_ms,
            ],
        )
        .await;
        self.finish(conn, r).await
    }

    async fn secret(&self, name: &str) -> Result<Option<SecretRow>, StoreError> {
        Ok(self
            .read(sql::SECRET, &[&name], |r| {
                Ok(SecretRow {
                    name: text(r, 0)?,
                    key_id: text(r, 1)?,
                    nonce: col::<&[u8]>(r, 2)?.to_vec(),
                    ciphertext: col::<&[u8]>(r, 3)?.to_vec(),
                    updated_at_ms: col(r, 4)?,
                })
            })
            .await?
            .into_iter()
            .next())
    }

    async fn secrets(&self) -> Result<Vec<SecretRow>, StoreError> {
        // The statement does not select the values: they never leave the database here.
        self.read(sql::SECRETS, &[], |r| {
            Ok(SecretRow {
                name: text(r, 0)?,
                key_id: text(r, 1)?,
                nonce: Vec::new(),
                ciphertext: Vec::new(),
                updated_at_ms: col(r, 2)?,
            })
        })
        .await
    }

    async fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        let mut conn = self.take().await?;
        let n = Self::exec(&mut conn, sql::DELETE_SECRET, &[&name]).await?;
        self.give(conn);
        Ok(n > 0)
    }

    async fn start_run(
        &self,
        token: &FenceToken,
        run: &RunRow,
        advance: Option<&ScheduleAdvance>,
    ) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            Self::exec(
                &mut conn,
                sql::ABANDON_OLD_RUNS,
                &[&run.started_at_ms, &run.connector_id.as_str(), &token.epoch],
            )
            .await?;
            let running = Self::rows(&mut conn, sql::RUNNING_RUN, &[&run.connector_id.as_str()])
                .await?
                .first()
                .map(|r| text(r, 0))
                .transpose()?;
            if let Some(other) = running {
                return Err(StoreError::Conflict(format!(
                    "connector {} is already running (run {other}); wait for it to finish",
                    run.connector_id
                )));
            }
            let connector = run.connector_id.as_str();
            if Self::rows(&mut conn, sql::CONNECTOR_EXISTS, &[&connector])
                .await?
                .is_empty()
            {
                return Err(StoreError::Conflict(deleted_conflict(connector)));
            }
            Self::exec(
                &mut conn,
                sql::INSERT_RUN,
                &[
                    &run.id.as_str(),
                    &run.connector_id.as_str(),
                    &token.instance.as_str(),
                    &token.epoch,
                    &run.started_at_ms,
                    &run.mode.as_str(),
                    &run.trigger.as_str(),
                ],
            )
            .await?;
            if let Some(a) = advance {
                let id = a.schedule_id.as_str();
                Self::exec(
                    &mut conn,
                    sql::SET_SCHEDULE_NEXT_RUN,
                    &[&id, &a.next_run_ms],
                )
                .await?;
            }
            Ok(())
        }
        .await;
        self.finish(conn, r).await
    }

    async fn finish_run(&self, run: &RunRow) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::FINISH_RUN,
            &[
                &run.id.as_str(),
                &run.status.as_str(),
                &run.finished_at_ms,
                &run.added,
                &run.updated,
                &run.unchanged,
                &run.deleted,
                &run.failed,
                &run.error.as_deref(),
                &run.errors_json.as_deref(),
            ],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        Ok(self
            .read(sql::RUN, &[&id], run_row)
            .await?
            .into_iter()
            .next())
    }

    async fn runs(&self, connector: Option<&str>, limit: i64) -> Result<Vec<RunRow>, StoreError> {
        self.read(sql::RUNS, &[&connector, &limit], run_row).await
    }

    async fn dirty_objects(
        &self,
        connector: &str,
        limit: i64,
    ) -> Result<Vec<DirtyObject>, StoreError> {
        self.read(sql::DIRTY_OBJECTS, &[&connector, &limit], |r| {
            Ok(DirtyObject {
                anchor: text(r, 0)?,
                object_type: text(r, 1)?,
                attributes_json: text(r, 2)?,
                deleted: col(r, 3)?,
                rev: col(r, 4)?,
            })
        })
        .await
    }

    async fn mark_for_recompose(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
    ) -> Result<u64, StoreError> {
        let ruled = json_list(ruled_types);
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            let n = Self::exec(
                &mut conn,
                sql::MARK_FOR_RECOMPOSE,
                &[&connector, &ruled.as_str()],
            )
            .await?;
            Self::journal(&mut conn, "compose", token.epoch, &token.instance, now_ms()).await?;
            Ok(n)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn settle_unruled(
        &self,
        token: &FenceToken,
        connector: &str,
        ruled_types: &[String],
        limit: i64,
    ) -> Result<u64, StoreError> {
        let ruled = json_list(ruled_types);
        let mut conn = self.begin().await?;
        let r = async {
            Self::check_fence(&mut conn, token).await?;
            // As `Composed` does: a deleted object goes, any other loses its mark.
            let params: [&dyn ToSql; 3] = [&connector, &ruled.as_str(), &limit];
            let mut n = Self::exec(&mut conn, sql::DROP_UNRULED_TOMBSTONES, &params).await?;
            n += Self::exec(&mut conn, sql::SETTLE_UNRULED, &params).await?;
            Self::journal(&mut conn, "compose", token.epoch, &token.instance, now_ms()).await?;
            Ok(n)
        }
        .await;
        self.finish(conn, r).await
    }

    async fn link(&self, connector: &str, anchor: &str) -> Result<Option<LinkRow>, StoreError> {
        Ok(self
            .read(sql::LINK, &[&connector, &anchor], link_row)
            .await?
            .into_iter()
            .next())
    }

    async fn links_of_identity(&self, identity_id: &str) -> Result<Vec<LinkRow>, StoreError> {
        self.read(sql::LINKS_OF_IDENTITY, &[&identity_id], link_row)
            .await
    }

    async fn identities_by_key(&self, attr: &str, value: &str) -> Result<Vec<String>, StoreError> {
        self.read(sql::IDENTITIES_BY_KEY, &[&attr, &value], |r| text(r, 0))
            .await
    }

    async fn identity(&self, id: &str) -> Result<Option<IdentityRow>, StoreError> {
        Ok(self
            .read(sql::IDENTITY, &[&id], identity_row)
            .await?
            .into_iter()
            .next())
    }

    async fn stored_objects(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<HashMap<String, StoredObject>, StoreError> {
        if anchors.is_empty() {
            return Ok(HashMap::new());
        }
        let anchors: Vec<&String> = anchors.iter().collect();
        let mut conn = self.take().await?;
        let r = Self::stored_objects_on(&mut conn, connector, &anchors).await;
        self.kept(conn, r)
    }

    async fn links_for(
        &self,
        connector: &str,
        anchors: &[String],
    ) -> Result<Vec<LinkRow>, StoreError> {
        if anchors.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.take().await?;
        let r = Self::links_for_on(&mut conn, connector, anchors).await;
        self.kept(conn, r)
    }

    async fn identities_by_keys(
        &self,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.take().await?;
        let r = Self::identities_by_keys_on(&mut conn, keys).await;
        self.kept(conn, r)
    }

    async fn identities_with_links(
        &self,
        ids: &[String],
    ) -> Result<(Vec<IdentityRow>, Vec<LinkRow>), StoreError> {
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut conn = self.take().await?;
        let r = Self::identities_with_links_on(&mut conn, ids).await;
        self.kept(conn, r)
    }

    async fn identities(
        &self,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<IdentityRow>, StoreError> {
        let pattern = search.map(like_pattern);
        self.read(
            sql::IDENTITIES,
            &[&pattern.as_deref(), &search, &after, &limit],
            identity_row,
        )
        .await
    }

    async fn count_identities(&self) -> Result<i64, StoreError> {
        let v = self.read(sql::COUNT_IDENTITIES, &[], |r| col(r, 0)).await?;
        Ok(v.into_iter().next().unwrap_or(0))
    }

    async fn connector_space(
        &self,
        connector: &str,
        search: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SpaceObjectRow>, StoreError> {
        let anchor_pattern = search.map(like_pattern);
        let json_pattern = search.map(|q| like_pattern(&json_escaped(q)));
        let mut params: Vec<&dyn ToSql> = vec![&connector, &anchor_pattern, &json_pattern, &limit];
        let q = match &after {
            Some(a) => {
                params.push(a);
                sql::CONNECTOR_SPACE_AFTER
            }
            None => sql::CONNECTOR_SPACE,
        };
        self.read(q, &params, |r| {
            Ok(SpaceObjectRow {
                anchor: text(r, 0)?,
                object_type: text(r, 1)?,
                dn: opt::<&str>(r, 2)?.map(str::to_string),
                deleted: col(r, 3)?,
                identity_id: opt::<&str>(r, 4)?.map(str::to_string),
            })
        })
        .await
    }

    async fn connector_object(
        &self,
        connector: &str,
        anchor: &str,
    ) -> Result<Option<SpaceObject>, StoreError> {
        Ok(self
            .read(sql::CONNECTOR_OBJECT, &[&connector, &anchor], |r| {
                Ok(SpaceObject {
                    anchor: text(r, 0)?,
                    object_type: text(r, 1)?,
                    attributes_json: text(r, 2)?,
                    deleted: col(r, 3)?,
                    pending: col(r, 4)?,
                    seen_run: opt::<&str>(r, 5)?.map(str::to_string),
                    updated_at_ms: col(r, 6)?,
                    identity_id: opt::<&str>(r, 7)?.map(str::to_string),
                })
            })
            .await?
            .into_iter()
            .next())
    }

    async fn commit_compose(
        &self,
        token: &FenceToken,
        writes: &[ComposeWrite],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.begin().await?;
        let r = Self::compose_chunk(&mut conn, token, writes, now_ms).await;
        self.finish(conn, r).await
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let mut conn = self.take().await?;
        Self::exec(
            &mut conn,
            sql::INSERT_AUDIT,
            &[
                &e.at_ms,
                &e.actor.as_str(),
                &e.action.as_str(),
                &e.target.as_str(),
                &e.detail.as_str(),
            ],
        )
        .await?;
        self.give(conn);
        Ok(())
    }

    async fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let (exact, prefix) = f.action_match();
        let prefix = prefix.map(like_prefix);
        let params: [&dyn ToSql; 6] = [
            &f.actor.as_deref(),
            &exact,
            &prefix,
            &f.since_ms,
            &f.until_ms,
            &f.limit,
        ];
        self.read(sql::AUDIT, &params, |r| {
            Ok(AuditEntry {
                at_ms: col(r, 0)?,
                actor: text(r, 1)?,
                action: text(r, 2)?,
                target: text(r, 3)?,
                detail: text(r, 4)?,
            })
        })
        .await
    }

    async fn journal(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(sql::READ_JOURNAL, &[], |r| Ok((text(r, 0)?, col(r, 1)?)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::MsSqlDialect;
    use sqlparser::parser::Parser;

    fn parse(stmt: &str) {
        // sqlparser does not know `EXEC @var = proc` (a return value into a variable); the rest
        // of such a statement is still checked.
        let checked = stmt.replace("EXEC @r = ", "EXEC ");
        if let Err(e) = Parser::parse_sql(&MsSqlDialect {}, &checked) {
            panic!("T-SQL does not parse: {e}\n{stmt}");
        }
    }

    #[test]
    fn a_migration_lock_not_granted_stops_the_migration() {
        assert!(applock_granted(0).is_ok() && applock_granted(1).is_ok());
        for code in [-1, -2, -3, -999] {
            let e = applock_granted(code).unwrap_err().to_string();
            assert!(e.contains(&code.to_string()), "{e}");
        }
        assert!(applock_granted(-1)
            .unwrap_err()
            .to_string()
            .contains("timed out"));
    }

    #[test]
    fn a_lock_timeout_is_a_retryable_error() {
        assert!(lock_wait_exceeded().contains("retry"));
        assert_eq!(LOCK_WAIT_MS, 10_000);
        assert!(sql::SESSION_SETUP.ends_with(&LOCK_WAIT_MS.to_string()));
    }

    #[test]
    fn every_statement_parses_as_tsql() {
        for stmt in sql::ALL {
            parse(stmt);
        }
    }

    #[test]
    fn every_migration_parses_as_tsql() {
        for m in MSSQL {
            for stmt in m.statements {
                parse(stmt);
            }
        }
        // The sync-engine schema is among them.
        assert!(MSSQL
            .iter()
            .any(|m| m.version == 2 && !m.statements.is_empty()));
    }

    /// The constants of type `ty` declared in `module` before its `ALL`, and the names `ALL` lists.
    fn declared_and_listed(module: &str, ty: &str) -> (Vec<String>, Vec<String>) {
        let src = include_str!("mssql.rs");
        let (_, rest) = src.split_once(&format!("pub mod {module} {{")).unwrap();
        let (body, rest) = rest.split_once("pub const ALL: ").unwrap();
        let (_, rest) = rest.split_once("= &[").unwrap();
        let (names, _) = rest.split_once("];").unwrap();
        let declared = body
            .lines()
            .filter_map(|line| line.trim().strip_prefix("pub const "))
            .filter_map(|rest| rest.split_once(':'))
            .filter(|(_, t)| t.trim_start().starts_with(ty))
            .map(|(name, _)| name.to_string())
            .collect();
        let listed = names
            .split(',')
            .map(|n| n.trim().trim_start_matches('&').to_string())
            .filter(|n| !n.is_empty())
            .collect();
        (declared, listed)
    }

    /// Every statement of `mod sql` and every shape of `mod multi` is in its module's `ALL`,
    /// so the parse tests see each of them.
    #[test]
    fn every_statement_is_listed_for_the_parse_test() {
        for (module, ty, len) in [
            ("sql", "&str", sql::ALL.len()),
            ("multi", "Shape", multi::ALL.len()),
        ] {
            let (declared, listed) = declared_and_listed(module, ty);
            for name in &declared {
                assert!(
                    listed.contains(name),
                    "{name} is missing from {module}::ALL"
                );
            }
            assert_eq!(declared.len(), len, "{module}::ALL lists a statement twice");
            assert_eq!(listed.len(), len);
        }
    }

    /// The highest `@Pn` a statement names: the parameters it must be sent with.
    fn highest_param(q: &str) -> usize {
        q.split("@P")
            .skip(1)
            .filter_map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// Each shape parses at several row counts, up to the most one statement carries, and
    /// names exactly the parameters it is sent with.
    #[test]
    fn every_multi_row_statement_parses_as_tsql() {
        for shape in multi::ALL {
            let max = shape.max_rows();
            for rows in [1, 2, 3, 17, max - 1, max] {
                let q = shape.sql(rows);
                parse(&q);
                assert_eq!(
                    highest_param(&q),
                    shape.params(rows),
                    "{} {rows}",
                    shape.name
                );
            }
        }
        // Rows are listed with their parameters in order, and numbered when asked.
        assert_eq!(
            multi::SEEN_OBJECTS.sql(2),
            "UPDATE c SET seen_run = @P2 FROM cs_objects c JOIN (VALUES (@P3), (@P4)) v(anchor) \
             ON c.connector_id = @P1 AND c.anchor = v.anchor"
        );
        assert!(multi::INSERT_AUDITS
            .sql(2)
            .contains("(VALUES (@P1, @P2, @P3, @P4, @P5, 0), (@P6, @P7, @P8, @P9, @P10, 1))"));
    }

    #[test]
    fn multi_row_statements_stay_within_sql_server_limits() {
        for shape in multi::ALL {
            let max = shape.max_rows();
            assert!(max <= multi::MAX_ROWS, "{}", shape.name);
            // sp_executesql's @stmt and @params count against the 2,100 too.
            assert!(shape.params(max) <= multi::MAX_PARAMS - 2, "{}", shape.name);
            // And the limits, not a smaller number, decide the rows.
            assert!(
                max == multi::MAX_ROWS || shape.params(max + 1) > multi::MAX_PARAMS - 16,
                "{}",
                shape.name
            );
        }
        assert_eq!(multi::STORED_OBJECTS.max_rows(), 1000);
        assert_eq!(multi::WRITE_OBJECTS.max_rows(), 695);
        assert_eq!(multi::PUT_IDENTITIES.max_rows(), 418);
    }

    /// A connection that answers from a script and records the requests it is sent, each
    /// checked: it parses as T-SQL and binds exactly the parameters it names, within the limit.
    struct Recorder<F> {
        sent: Vec<String>,
        answer: F,
    }

    impl<F> Recorder<F> {
        fn new(answer: F) -> Self {
            Recorder {
                sent: Vec::new(),
                answer,
            }
        }

        fn record(&mut self, q: &str, params: &[&dyn ToSql]) {
            parse(q);
            assert_eq!(highest_param(q), params.len(), "{q}");
            assert!(params.len() <= multi::MAX_PARAMS - 2, "{q}");
            self.sent.push(q.to_string());
        }
    }

    #[async_trait]
    impl<F> Wire for Recorder<F>
    where
        F: FnMut(&str, &[tiberius::ColumnData<'_>]) -> Vec<Vec<Row>> + Send,
    {
        async fn fetch(
            &mut self,
            q: &str,
            params: &[&dyn ToSql],
        ) -> Result<Vec<Vec<Row>>, StoreError> {
            self.record(q, params);
            let values: Vec<_> = params.iter().map(|p| p.to_sql()).collect();
            Ok((self.answer)(q, &values))
        }

        /// The script sees writes too (it may keep state), but the count is not read.
        async fn run(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<u64, StoreError> {
            self.fetch(q, params).await.map(|_| 0)
        }
    }

    /// BEGIN, sent by `begin`, and COMMIT, sent by `finish`, around every transaction body.
    const TX_FRAME: usize = 2;

    fn row(values: Vec<tiberius::ColumnData<'static>>) -> Row {
        values
            .into_iter()
            .enumerate()
            .fold(Row::builder(), |b, (i, v)| {
                b.column(format!("c{i}"), tiberius::ColumnType::Null, v)
            })
            .build()
    }

    fn string(s: &str) -> tiberius::ColumnData<'static> {
        tiberius::ColumnData::String(Some(s.to_string().into()))
    }

    fn token() -> FenceToken {
        FenceToken {
            instance: "im-a".into(),
            incarnation: "p1".into(),
            epoch: 7,
        }
    }

    /// The fence as `token` holds it.
    fn fence_row() -> Row {
        let t = token();
        row(vec![
            tiberius::ColumnData::I64(Some(t.epoch)),
            string(&t.instance),
            string(&t.incarnation),
        ])
    }

    fn text_of(v: &tiberius::ColumnData<'_>) -> String {
        match v {
            tiberius::ColumnData::String(Some(s)) => s.to_string(),
            other => panic!("not a string: {other:?}"),
        }
    }

    /// Answers the fence read with `token`'s fence, the batch record with a sequence number,
    /// and the stored-objects read from `stored` (anchor → type, attributes, deleted), which
    /// the MERGE of new and changed objects writes to.
    fn import_answers(
        mut stored: HashMap<String, (String, String, bool)>,
    ) -> impl FnMut(&str, &[tiberius::ColumnData<'_>]) -> Vec<Vec<Row>> + Send {
        // The run that last saw each anchor, as the MERGE and the seen update record it.
        let mut seen: HashMap<String, String> = HashMap::new();
        move |q, values| {
            let shared = multi::WRITE_OBJECTS.shared;
            if q.starts_with("MERGE cs_objects")
                && q == multi::WRITE_OBJECTS.sql((values.len() - shared) / 3)
            {
                for o in values[shared..].chunks(3) {
                    let state = (text_of(&o[1]), text_of(&o[2]), false);
                    stored.insert(text_of(&o[0]), state);
                    if let tiberius::ColumnData::String(Some(run)) = &values[2] {
                        seen.insert(text_of(&o[0]), run.to_string());
                    }
                }
            }
            let seen_shared = multi::SEEN_OBJECTS.shared;
            if values.len() > seen_shared
                && q == multi::SEEN_OBJECTS.sql(values.len() - seen_shared)
            {
                for a in &values[seen_shared..] {
                    seen.insert(text_of(a), text_of(&values[1]));
                }
            }
            if q == sql::FENCE_LOCKED {
                return vec![vec![fence_row()]];
            }
            if q == sql::IMPORT_TAIL {
                return vec![vec![row(vec![tiberius::ColumnData::I64(Some(42))])]];
            }
            if q == multi::STORED_OBJECTS.sql(values.len() - 1) {
                let found = values[1..]
                    .iter()
                    .filter_map(|v| match v {
                        tiberius::ColumnData::String(Some(a)) => stored.get_key_value(a.as_ref()),
                        _ => None,
                    })
                    .map(|(a, (t, attrs, deleted))| {
                        row(vec![
                            string(a),
                            string(t),
                            string(attrs),
                            tiberius::ColumnData::Bit(Some(*deleted)),
                            tiberius::ColumnData::String(seen.get(a).map(|r| r.clone().into())),
                        ])
                    })
                    .collect();
                return vec![found];
            }
            Vec::new()
        }
    }

    fn object(i: usize, attrs: &str) -> CsObject {
        CsObject {
            anchor: format!("uid={i},ou=people"),
            object_type: "person".into(),
            attributes_json: attrs.into(),
        }
    }

    /// A full import's page of `n` objects: a third stored as they are, a third stored with
    /// other attributes, a third new.
    fn mixed_page(n: usize) -> (ImportBatch, HashMap<String, (String, String, bool)>) {
        let objects: Vec<CsObject> = (0..n)
            .map(|i| object(i, &format!("{{\"n\":{i}}}")))
            .collect();
        let stored = objects
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 2)
            .map(|(i, o)| {
                let attrs = if i % 3 == 0 {
                    o.attributes_json.clone()
                } else {
                    "{}".into()
                };
                (o.anchor.clone(), (o.object_type.clone(), attrs, false))
            })
            .collect();
        let batch = ImportBatch {
            connector: "corp".into(),
            object_type: "person".into(),
            objects,
            watermark: None,
            seen_in_run: Some("run-1".into()),
            compose: true,
            composed: None,
        };
        (batch, stored)
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// What `commit_import_batch` sends for the page, and what it counted.
    fn import(
        batch: &ImportBatch,
        stored: &HashMap<String, (String, String, bool)>,
    ) -> (Vec<String>, BatchOutcome) {
        let mut w = Recorder::new(import_answers(stored.clone()));
        let out = block_on(MssqlStore::import_page(&mut w, &token(), batch, 1)).unwrap();
        (w.sent, out)
    }

    /// One object at a time, a page cost BEGIN, the fence read, two requests an object (read
    /// it, then write it or record it seen), the batch record, the journal entry and COMMIT:
    /// 25 round trips for 10 objects, 1,005 for 500. Now the count does not grow with the page
    /// until a statement is full.
    #[test]
    fn an_import_page_costs_the_same_round_trips_at_any_size() {
        let mut trips = Vec::new();
        for n in [10, 500, 1000, 1200] {
            let (batch, stored) = mixed_page(n);
            let (sent, out) = import(&batch, &stored);
            let third = |r: usize| ((n + 2 - r) / 3) as u64;
            assert_eq!(
                (out.added, out.updated, out.unchanged),
                (third(2), third(1), third(0))
            );
            assert_eq!(out.seq, 42);
            // The fence check comes first; the batch record and the journal entry last.
            assert_eq!(sent.first().map(String::as_str), Some(sql::FENCE_LOCKED));
            assert_eq!(sent.last().map(String::as_str), Some(sql::IMPORT_TAIL));
            trips.push(TX_FRAME + sent.len());
        }
        // BEGIN, fence, stored state, MERGE, seen, tail, COMMIT; at 1,200 objects the read and
        // the MERGE take two statements each.
        assert_eq!(trips, vec![7, 7, 7, 9]);

        // Without deletion detection the unchanged need no write; an empty page (the end of a
        // read, with its watermark) is the fence, the tail and the frame.
        let (mut batch, stored) = mixed_page(500);
        batch.seen_in_run = None;
        assert_eq!(TX_FRAME + import(&batch, &stored).0.len(), 6);
        batch.objects.clear();
        batch.watermark = Some("w".into());
        assert_eq!(TX_FRAME + import(&batch, &stored).0.len(), 4);
    }

    /// A page carrying its own compose adds the compose statements and, when it holds both
    /// composed and marked objects, one MERGE; still no more as the page grows.
    #[test]
    fn a_page_with_its_compose_costs_a_constant_number_of_round_trips() {
        let mut trips = Vec::new();
        for n in [10, 300] {
            let (mut batch, stored) = mixed_page(n);
            let plain = import(&batch, &stored).0.len();
            // Every other object composed by the page.
            batch.composed = Some(PageCompose {
                anchors: batch
                    .objects
                    .iter()
                    .step_by(2)
                    .map(|o| o.anchor.clone())
                    .collect(),
                writes: compose_chunk_of(n)
                    .into_iter()
                    .filter(|w| !matches!(w, ComposeWrite::Composed { .. }))
                    .collect(),
            });
            let (sent, out) = import(&batch, &stored);
            assert_eq!(out.added + out.updated + out.unchanged, n as u64);
            assert_eq!(sent.last().map(String::as_str), Some(sql::IMPORT_TAIL));
            let composed_merges = sent.iter().filter(|q| q.contains("@P5 = 1")).count();
            assert_eq!(composed_merges, 2, "{sent:#?}");
            trips.push((plain, sent.len()));
        }
        // The plain page as above; with its compose: one more MERGE, then keys deleted,
        // identities, keys, links and audit (the page clears no marks).
        assert_eq!(trips, vec![(5, 11), (5, 11)]);
    }

    /// An anchor the page holds twice is compared with what the page wrote before it, read
    /// back in a second round.
    #[test]
    fn a_page_holding_an_anchor_twice_writes_it_in_page_order() {
        let page = |objects| ImportBatch {
            connector: "corp".into(),
            object_type: "person".into(),
            objects,
            watermark: None,
            seen_in_run: None,
            compose: true,
            composed: None,
        };
        let none = HashMap::new();
        let (sent, out) = import(
            &page(vec![object(1, "a"), object(2, "a"), object(1, "b")]),
            &none,
        );
        assert_eq!((out.added, out.updated, out.unchanged), (2, 1, 0));
        assert_eq!(
            object_merges(&sent),
            vec![&multi::WRITE_OBJECTS.sql(2), &multi::WRITE_OBJECTS.sql(1)]
        );
        let stored_reads = sent
            .iter()
            .filter(|q| q.starts_with("SELECT v.anchor"))
            .count();
        assert_eq!(stored_reads, 2);
        let (_, out) = import(&page(vec![object(1, "a"), object(1, "a")]), &none);
        assert_eq!((out.added, out.updated, out.unchanged), (1, 0, 1));
        // Anchors that differ in case only may be one row to the server: never in one MERGE.
        let mut upper = object(1, "b");
        upper.anchor = upper.anchor.to_uppercase();
        let (sent, _) = import(&page(vec![object(1, "a"), upper]), &none);
        assert_eq!(
            object_merges(&sent),
            vec![&multi::WRITE_OBJECTS.sql(1), &multi::WRITE_OBJECTS.sql(1)]
        );
    }

    /// The connector-space MERGEs among the statements sent.
    /// With deletion detection a run imports each anchor once: one an earlier round of the
    /// page wrote (read back with the run that saw it) is a duplicate, neither written again
    /// nor counted; so is one the stored state says this run saw.
    #[test]
    fn a_full_import_refuses_an_anchor_the_run_already_imported() {
        let page = |objects| ImportBatch {
            connector: "corp".into(),
            object_type: "person".into(),
            objects,
            watermark: None,
            seen_in_run: Some("run-1".into()),
            compose: true,
            composed: None,
        };
        let none = HashMap::new();
        let (sent, out) = import(
            &page(vec![object(1, "a"), object(2, "a"), object(1, "b")]),
            &none,
        );
        assert_eq!((out.added, out.updated, out.unchanged), (2, 0, 0));
        assert_eq!(out.duplicates, vec![object(1, "b").anchor]);
        assert_eq!(object_merges(&sent), vec![&multi::WRITE_OBJECTS.sql(2)]);

        // Unchanged ones are recorded as seen, and then refused too.
        let stored: HashMap<_, _> = [(object(1, "a").anchor, ("person".into(), "a".into(), false))]
            .into_iter()
            .collect();
        let (sent, out) = import(&page(vec![object(1, "a"), object(1, "a")]), &stored);
        assert_eq!((out.added, out.updated, out.unchanged), (0, 0, 1));
        assert_eq!(out.duplicates.len(), 1);
        assert!(object_merges(&sent).is_empty());
    }

    fn object_merges(sent: &[String]) -> Vec<&String> {
        sent.iter()
            .filter(|q| q.starts_with("MERGE cs_objects"))
            .collect()
    }

    fn fence_only(q: &str, _: &[tiberius::ColumnData<'_>]) -> Vec<Vec<Row>> {
        if q == sql::FENCE_LOCKED {
            vec![vec![fence_row()]]
        } else {
            Vec::new()
        }
    }

    /// A composer chunk of `n` new identities: each put with two join keys, linked, composed
    /// and audited.
    fn compose_chunk_of(n: usize) -> Vec<ComposeWrite> {
        (0..n)
            .flat_map(|i| {
                let id = format!("idn-{i}");
                let anchor = format!("uid={i},ou=people");
                [
                    ComposeWrite::PutIdentity {
                        identity: IdentityRow {
                            id: id.clone(),
                            display_name: format!("Person {i}"),
                            attributes_json: "{}".into(),
                            created_at_ms: 1,
                            updated_at_ms: 1,
                        },
                        keys: vec![
                            ("uid".into(), format!("p{i}")),
                            ("mail".into(), format!("p{i}@x")),
                        ],
                    },
                    ComposeWrite::PutLink(LinkRow {
                        connector_id: "corp".into(),
                        anchor: anchor.clone(),
                        identity_id: id.clone(),
                        precedence: 1,
                        contribution_json: "{}".into(),
                    }),
                    ComposeWrite::Composed {
                        connector_id: "corp".into(),
                        anchor,
                        rev: 1,
                    },
                    ComposeWrite::Audit(AuditEntry {
                        at_ms: 1,
                        actor: "composer".into(),
                        action: "identity.put".into(),
                        target: id,
                        detail: "{}".into(),
                    }),
                ]
            })
            .collect()
    }

    /// One write at a time, such a chunk cost 10 round trips an object (an identity upsert of
    /// two, its keys' delete and one insert a key, a link upsert of two, two for the composed
    /// mark, one for the audit entry) plus BEGIN, fence, journal and COMMIT: 104 for 10
    /// objects, 5,004 for 500. Now it is a few statements a table.
    #[test]
    fn a_compose_chunk_costs_a_few_round_trips_a_table() {
        let mut trips = Vec::new();
        for n in [10, 300, 500, 1000] {
            let writes = compose_chunk_of(n);
            let mut w = Recorder::new(fence_only);
            block_on(MssqlStore::compose_chunk(&mut w, &token(), &writes, 1)).unwrap();
            assert_eq!(w.sent.first().map(String::as_str), Some(sql::FENCE_LOCKED));
            assert_eq!(w.sent.last().map(String::as_str), Some(sql::JOURNAL));
            trips.push(TX_FRAME + w.sent.len());
        }
        // BEGIN, fence, keys deleted, identities, keys, links, composed, audit, journal,
        // COMMIT, up to 347 objects with two keys each; past that one more request for every
        // 418 rows of a five-column statement and 695 keys.
        assert_eq!(trips, vec![10, 10, 14, 19]);
    }

    /// The composer's reads for a chunk: one request each up to a statement's worth of input
    /// (one a link, two an identity one by one).
    #[test]
    fn prefetch_reads_cost_one_round_trip_a_statement() {
        for (n, per_read) in [(10, 1), (500, 1), (1000, 1), (1200, 2)] {
            let strings: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
            let pairs: Vec<(String, String)> =
                strings.iter().map(|s| ("mail".into(), s.clone())).collect();
            let mut w = Recorder::new(|_: &str, _: &[tiberius::ColumnData<'_>]| Vec::new());
            block_on(async {
                MssqlStore::links_for_on(&mut w, "corp", &strings)
                    .await
                    .unwrap();
                MssqlStore::identities_by_keys_on(&mut w, &pairs)
                    .await
                    .unwrap();
                MssqlStore::identities_with_links_on(&mut w, &strings)
                    .await
                    .unwrap();
            });
            assert_eq!(w.sent.len(), 3 * per_read, "{n}");
        }
    }

    #[test]
    fn compose_rows_are_the_end_state_of_the_writes_in_order() {
        let put =
            |id: &str, name: &str, at: i64, keys: &[(&str, &str)]| ComposeWrite::PutIdentity {
                identity: IdentityRow {
                    id: id.into(),
                    display_name: name.into(),
                    attributes_json: "{}".into(),
                    created_at_ms: at,
                    updated_at_ms: at,
                },
                keys: keys
                    .iter()
                    .map(|(a, v)| (a.to_string(), v.to_string()))
                    .collect(),
            };
        let delete = |id: &str| ComposeWrite::DeleteIdentity { id: id.into() };
        let link = |anchor: &str, id: &str| {
            ComposeWrite::PutLink(LinkRow {
                connector_id: "corp".into(),
                anchor: anchor.into(),
                identity_id: id.into(),
                precedence: 1,
                contribution_json: "{}".into(),
            })
        };
        let unlink = |anchor: &str| ComposeWrite::DeleteLink {
            connector_id: "corp".into(),
            anchor: anchor.into(),
        };
        let writes = vec![
            // Put twice: the last values, the first put's creation time (it inserted the row).
            put("a", "A1", 1, &[("mail", "a1")]),
            put("a", "A2", 2, &[("mail", "a2"), ("mail", "a2")]),
            // Deleted, then put again: a new row with the later put's creation time.
            delete("b"),
            put("b", "B", 3, &[("uid", "b")]),
            // Put, then deleted: gone, and so are its keys.
            put("c", "C", 4, &[("uid", "c")]),
            delete("c"),
            link("x", "a"),
            unlink("x"),
            unlink("y"),
            link("y", "b"),
            link("z", "a"),
            link("z", "b"),
        ];
        let rows = ComposeRows::of(&writes);
        assert_eq!(rows.touched, vec!["a", "b", "c"]);
        assert_eq!(rows.deleted, vec!["b", "c"]);
        let puts: Vec<(&str, &str, i64, i64)> = rows
            .puts
            .iter()
            .map(|p| {
                (
                    p.row.id.as_str(),
                    p.row.display_name.as_str(),
                    *p.created_at_ms,
                    p.row.updated_at_ms,
                )
            })
            .collect();
        assert_eq!(puts, vec![("a", "A2", 1, 2), ("b", "B", 3, 3)]);
        assert_eq!(rows.keys, vec![("mail", "a2", "a"), ("uid", "b", "b")]);
        assert_eq!(rows.links_deleted, vec![("corp", "x")]);
        let links: Vec<(&str, &str)> = rows
            .links_put
            .iter()
            .map(|l| (l.anchor.as_str(), l.identity_id.as_str()))
            .collect();
        assert_eq!(links, vec![("y", "b"), ("z", "b")]);
        // Keys are deleted before they are written again, a deleted identity before it is
        // inserted anew.
        let order: Vec<String> = rows
            .statements()
            .into_iter()
            .map(|(q, _)| q.split(" FROM").next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            order,
            vec![
                "DELETE k",
                "DELETE i",
                "MERGE identities AS t USING (VALUES (@P1, @P2, @P3, @P4, @P5), (@P6, @P7, @P8, @P9, @P10)) AS v(id, display_name, attributes_json, created_at, updated_at) ON t.id = v.id WHEN MATCHED THEN UPDATE SET display_name = v.display_name, attributes_json = v.attributes_json, updated_at = v.updated_at WHEN NOT MATCHED THEN INSERT (id, display_name, attributes_json, created_at, updated_at) VALUES (v.id, v.display_name, v.attributes_json, v.created_at, v.updated_at);",
                "INSERT INTO identity_keys (attr, value, identity_id) SELECT DISTINCT v.attr, v.value, v.identity_id",
                "DELETE l",
                "MERGE identity_links AS t USING (VALUES (@P1, @P2, @P3, @P4, @P5), (@P6, @P7, @P8, @P9, @P10)) AS v(connector_id, anchor, identity_id, precedence, contribution_json) ON t.connector_id = v.connector_id AND t.anchor = v.anchor WHEN MATCHED THEN UPDATE SET identity_id = v.identity_id, precedence = v.precedence, contribution_json = v.contribution_json WHEN NOT MATCHED THEN INSERT (connector_id, anchor, identity_id, precedence, contribution_json) VALUES (v.connector_id, v.anchor, v.identity_id, v.precedence, v.contribution_json);",
            ]
        );
    }

    #[test]
    fn like_patterns_are_literal_substrings() {
        assert_eq!(like_pattern("ann"), "%ann%");
        assert_eq!(like_pattern(r"100%_[x]\y"), r"%100\%\_\[x]\\y%");
    }

    #[test]
    fn the_parser_catches_typos() {
        // Guard against a parser that accepts anything: these must fail.
        for bad in [
            "SELEC epoch FROM fence",
            "UPDATE fence SET epoch = WHERE id = 1",
            "INSERT INTO fence (id VALUES (1)",
        ] {
            assert!(Parser::parse_sql(&MsSqlDialect {}, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fenced_reads_take_update_locks() {
        assert!(sql::FENCE_LOCKED.contains("WITH (UPDLOCK, HOLDLOCK)"));
    }

    #[test]
    fn bad_ado_string_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(MssqlStore::connect(
                "Server=tcp:127.0.0.1,notaport;Database=x;",
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.is_empty());
    }
}
