//! Every statement the SQL Server store sends.

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
pub const COUNT_BATCHES: &str = "SELECT COUNT_BIG(*) FROM import_batches WHERE connector_id = @P1";
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
pub const CONNECTOR_OBJECTS: &str = "SELECT COUNT_BIG(*) FROM cs_objects WHERE connector_id = @P1";
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
