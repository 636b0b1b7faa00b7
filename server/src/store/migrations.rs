//! Versioned schema migrations, one list per backend with the same versions and meaning.
//! Each runner applies them under a database-wide lock (SQLite: the write lock of
//! `BEGIN IMMEDIATE`; SQL Server: `sp_getapplock`), re-reading what is applied inside the lock,
//! so two instances starting at once apply each version exactly once.

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// Pruning finds old rows by time without scanning the tables; the same text on both backends.
const RETENTION_INDEXES: &[&str] = &[
    "CREATE INDEX runs_finished ON runs (finished_at)",
    "CREATE INDEX audit_log_at ON audit_log (at)",
    "CREATE INDEX import_batches_committed ON import_batches (committed_at)",
    "CREATE INDEX fence_journal_at ON fence_journal (at)",
];

pub const SQLITE: &[Migration] = &[
    Migration {
    version: 1,
    name: "initial schema",
    statements: &[
        "CREATE TABLE fence (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL, holder TEXT NOT NULL, updated_at INTEGER NOT NULL)",
        "INSERT INTO fence (id, epoch, holder, updated_at) VALUES (1, 0, '', 0)",
        "CREATE TABLE fence_journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, epoch INTEGER NOT NULL, instance TEXT NOT NULL, at INTEGER NOT NULL)",
        "CREATE TABLE engine_instances (instance TEXT PRIMARY KEY, host TEXT NOT NULL, role TEXT NOT NULL, epoch INTEGER NOT NULL, version TEXT NOT NULL, started_at INTEGER NOT NULL, last_heartbeat INTEGER NOT NULL)",
        "CREATE TABLE engine_state (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, epoch INTEGER NOT NULL, last_tick INTEGER NOT NULL)",
        "CREATE TABLE relays (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL, revoked_at INTEGER, last_seen INTEGER, version TEXT, connected_instance TEXT, connected_since INTEGER)",
        "CREATE TABLE connectors (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, config_json TEXT NOT NULL, relay_id TEXT, is_canary INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)",
        "CREATE TABLE schedules (id TEXT PRIMARY KEY, connector_id TEXT NOT NULL, kind TEXT NOT NULL, spec TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1, next_run INTEGER)",
        "CREATE TABLE runs (id TEXT PRIMARY KEY, connector_id TEXT NOT NULL, instance TEXT NOT NULL, epoch INTEGER NOT NULL, status TEXT NOT NULL, started_at INTEGER NOT NULL, finished_at INTEGER, added INTEGER NOT NULL DEFAULT 0, updated INTEGER NOT NULL DEFAULT 0, deleted INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, error TEXT)",
        "CREATE TABLE import_batches (seq INTEGER PRIMARY KEY AUTOINCREMENT, connector_id TEXT NOT NULL, object_type TEXT NOT NULL, object_count INTEGER NOT NULL, watermark TEXT, epoch INTEGER NOT NULL, instance TEXT NOT NULL, committed_at INTEGER NOT NULL)",
        "CREATE TABLE watermarks (connector_id TEXT NOT NULL, object_type TEXT NOT NULL, value TEXT NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (connector_id, object_type))",
        "CREATE TABLE cs_objects (connector_id TEXT NOT NULL, anchor TEXT NOT NULL, object_type TEXT NOT NULL, attributes_json TEXT NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (connector_id, anchor))",
        "CREATE TABLE identities (id TEXT PRIMARY KEY, display_name TEXT NOT NULL, attributes_json TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)",
        "CREATE TABLE audit_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)",
        "CREATE TABLE secrets (ref TEXT PRIMARY KEY, key_id TEXT NOT NULL, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL, updated_at INTEGER NOT NULL)",
        "CREATE TABLE api_tokens (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created_at INTEGER NOT NULL)",
        "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
},
    Migration {
        version: 2,
        name: "sync engine",
        statements: &[
            "ALTER TABLE connectors ADD COLUMN rules_json TEXT NOT NULL DEFAULT '{}'",
            "ALTER TABLE schedules ADD COLUMN run_mode TEXT NOT NULL DEFAULT 'delta'",
            "ALTER TABLE schedules ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD COLUMN run_mode TEXT NOT NULL DEFAULT 'full'",
            "ALTER TABLE runs ADD COLUMN trigger_kind TEXT NOT NULL DEFAULT 'manual'",
            "ALTER TABLE runs ADD COLUMN unchanged INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD COLUMN errors_json TEXT",
            "CREATE INDEX runs_by_connector ON runs (connector_id, started_at)",
            "ALTER TABLE cs_objects ADD COLUMN dirty INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE cs_objects ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE cs_objects ADD COLUMN seen_run TEXT",
            "ALTER TABLE cs_objects ADD COLUMN rev INTEGER NOT NULL DEFAULT 0",
            // Objects imported before the composer existed are composed on the next run.
            "UPDATE cs_objects SET dirty = 1, rev = 1",
            "CREATE INDEX cs_objects_dirty ON cs_objects (connector_id, dirty, updated_at)",
            "CREATE INDEX cs_objects_seen ON cs_objects (connector_id, object_type, seen_run)",
            "CREATE TABLE identity_links (connector_id TEXT NOT NULL, anchor TEXT NOT NULL, identity_id TEXT NOT NULL, precedence INTEGER NOT NULL, contribution_json TEXT NOT NULL, PRIMARY KEY (connector_id, anchor))",
            "CREATE INDEX identity_links_identity ON identity_links (identity_id)",
            "CREATE TABLE identity_keys (attr TEXT NOT NULL, value TEXT NOT NULL, identity_id TEXT NOT NULL, PRIMARY KEY (attr, value, identity_id))",
            "CREATE INDEX identity_keys_identity ON identity_keys (identity_id)",
            "CREATE INDEX identities_name ON identities (display_name)",
        ],
    },
    Migration {
        version: 3,
        name: "fence incarnation",
        statements: &[
            // '' never matches a running process (incarnations are random), so after the upgrade
            // the next promotion needs a greater epoch, as after any restart.
            "ALTER TABLE fence ADD COLUMN holder_incarnation TEXT NOT NULL DEFAULT ''",
            // One registry row per process: two processes of one name (a recreated pod and its
            // cut-off predecessor) each show their own role instead of overwriting each other.
            "CREATE TABLE engine_instances_v3 (instance TEXT NOT NULL, incarnation TEXT NOT NULL, host TEXT NOT NULL, role TEXT NOT NULL, epoch INTEGER NOT NULL, version TEXT NOT NULL, started_at INTEGER NOT NULL, last_heartbeat INTEGER NOT NULL, PRIMARY KEY (instance, incarnation))",
            "INSERT INTO engine_instances_v3 (instance, incarnation, host, role, epoch, version, started_at, last_heartbeat) SELECT instance, '', host, role, epoch, version, started_at, last_heartbeat FROM engine_instances",
            "DROP TABLE engine_instances",
            "ALTER TABLE engine_instances_v3 RENAME TO engine_instances",
        ],
    },
    Migration {
        version: 4,
        name: "retention",
        statements: RETENTION_INDEXES,
    },
    Migration {
        version: 5,
        name: "drop unused identity name index",
        // No query reads it (identity search is a substring match, listing is by id), and its
        // random-order inserts cost about a tenth of a full composed import's CPU.
        statements: &["DROP INDEX identities_name"],
    },
];

pub const MSSQL: &[Migration] = &[
    Migration {
    version: 1,
    name: "initial schema",
    statements: &[
        "CREATE TABLE fence (id INT NOT NULL PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, holder NVARCHAR(256) NOT NULL, updated_at BIGINT NOT NULL)",
        "INSERT INTO fence (id, epoch, holder, updated_at) VALUES (1, 0, N'', 0)",
        "CREATE TABLE fence_journal (seq BIGINT IDENTITY(1, 1) NOT NULL PRIMARY KEY, kind NVARCHAR(32) NOT NULL, epoch BIGINT NOT NULL, instance NVARCHAR(256) NOT NULL, at BIGINT NOT NULL)",
        "CREATE TABLE engine_instances (instance NVARCHAR(256) NOT NULL PRIMARY KEY, host NVARCHAR(256) NOT NULL, role NVARCHAR(16) NOT NULL, epoch BIGINT NOT NULL, version NVARCHAR(64) NOT NULL, started_at BIGINT NOT NULL, last_heartbeat BIGINT NOT NULL)",
        "CREATE TABLE engine_state (id INT NOT NULL PRIMARY KEY CHECK (id = 1), holder NVARCHAR(256) NOT NULL, epoch BIGINT NOT NULL, last_tick BIGINT NOT NULL)",
        "CREATE TABLE relays (id NVARCHAR(64) NOT NULL PRIMARY KEY, name NVARCHAR(256) NOT NULL UNIQUE, token_hash NVARCHAR(128) NOT NULL UNIQUE, created_at BIGINT NOT NULL, revoked_at BIGINT NULL, last_seen BIGINT NULL, version NVARCHAR(64) NULL, connected_instance NVARCHAR(256) NULL, connected_since BIGINT NULL)",
        "CREATE TABLE connectors (id NVARCHAR(64) NOT NULL PRIMARY KEY, name NVARCHAR(256) NOT NULL UNIQUE, kind NVARCHAR(32) NOT NULL, config_json NVARCHAR(MAX) NOT NULL, relay_id NVARCHAR(64) NULL, is_canary BIT NOT NULL DEFAULT 0, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
        "CREATE TABLE schedules (id NVARCHAR(64) NOT NULL PRIMARY KEY, connector_id NVARCHAR(64) NOT NULL, kind NVARCHAR(16) NOT NULL, spec NVARCHAR(256) NOT NULL, enabled BIT NOT NULL DEFAULT 1, next_run BIGINT NULL)",
        "CREATE TABLE runs (id NVARCHAR(64) NOT NULL PRIMARY KEY, connector_id NVARCHAR(64) NOT NULL, instance NVARCHAR(256) NOT NULL, epoch BIGINT NOT NULL, status NVARCHAR(16) NOT NULL, started_at BIGINT NOT NULL, finished_at BIGINT NULL, added INT NOT NULL DEFAULT 0, updated INT NOT NULL DEFAULT 0, deleted INT NOT NULL DEFAULT 0, failed INT NOT NULL DEFAULT 0, error NVARCHAR(MAX) NULL)",
        "CREATE TABLE import_batches (seq BIGINT IDENTITY(1, 1) NOT NULL PRIMARY KEY, connector_id NVARCHAR(256) NOT NULL, object_type NVARCHAR(64) NOT NULL, object_count INT NOT NULL, watermark NVARCHAR(256) NULL, epoch BIGINT NOT NULL, instance NVARCHAR(256) NOT NULL, committed_at BIGINT NOT NULL)",
        "CREATE TABLE watermarks (connector_id NVARCHAR(256) NOT NULL, object_type NVARCHAR(64) NOT NULL, value NVARCHAR(256) NOT NULL, updated_at BIGINT NOT NULL, PRIMARY KEY (connector_id, object_type))",
        "CREATE TABLE cs_objects (connector_id NVARCHAR(256) NOT NULL, anchor NVARCHAR(450) NOT NULL, object_type NVARCHAR(64) NOT NULL, attributes_json NVARCHAR(MAX) NOT NULL, updated_at BIGINT NOT NULL, PRIMARY KEY (connector_id, anchor))",
        "CREATE TABLE identities (id NVARCHAR(64) NOT NULL PRIMARY KEY, display_name NVARCHAR(512) NOT NULL, attributes_json NVARCHAR(MAX) NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)",
        "CREATE TABLE audit_log (seq BIGINT IDENTITY(1, 1) NOT NULL PRIMARY KEY, at BIGINT NOT NULL, actor NVARCHAR(256) NOT NULL, action NVARCHAR(64) NOT NULL, target NVARCHAR(512) NOT NULL, detail NVARCHAR(MAX) NOT NULL)",
        "CREATE TABLE secrets (ref NVARCHAR(256) NOT NULL PRIMARY KEY, key_id NVARCHAR(64) NOT NULL, nonce VARBINARY(32) NOT NULL, ciphertext VARBINARY(MAX) NOT NULL, updated_at BIGINT NOT NULL)",
        "CREATE TABLE api_tokens (name NVARCHAR(128) NOT NULL PRIMARY KEY, token_hash NVARCHAR(128) NOT NULL, created_at BIGINT NOT NULL)",
        "CREATE TABLE settings (name NVARCHAR(128) NOT NULL PRIMARY KEY, value NVARCHAR(MAX) NOT NULL)",
    ],
},
    Migration {
        version: 2,
        name: "sync engine",
        statements: &[
            "ALTER TABLE connectors ADD rules_json NVARCHAR(MAX) NOT NULL DEFAULT N'{}'",
            "ALTER TABLE schedules ADD run_mode NVARCHAR(16) NOT NULL DEFAULT N'delta'",
            "ALTER TABLE schedules ADD created_at BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD run_mode NVARCHAR(16) NOT NULL DEFAULT N'full'",
            "ALTER TABLE runs ADD trigger_kind NVARCHAR(16) NOT NULL DEFAULT N'manual'",
            "ALTER TABLE runs ADD unchanged INT NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD errors_json NVARCHAR(MAX) NULL",
            "CREATE INDEX runs_by_connector ON runs (connector_id, started_at)",
            "ALTER TABLE cs_objects ADD dirty BIT NOT NULL DEFAULT 0",
            "ALTER TABLE cs_objects ADD deleted BIT NOT NULL DEFAULT 0",
            "ALTER TABLE cs_objects ADD seen_run NVARCHAR(64) NULL",
            "ALTER TABLE cs_objects ADD rev BIGINT NOT NULL DEFAULT 0",
            "UPDATE cs_objects SET dirty = 1, rev = 1",
            "CREATE INDEX cs_objects_dirty ON cs_objects (connector_id, dirty, updated_at)",
            "CREATE INDEX cs_objects_seen ON cs_objects (connector_id, object_type, seen_run)",
            // Keys of up to 1,412 and 1,184 bytes: over the 900-byte limit of a clustered index
            // key (SQL Server would only warn, then refuse long rows), within the 1,700 bytes of
            // a nonclustered one.
            "CREATE TABLE identity_links (connector_id NVARCHAR(256) NOT NULL, anchor NVARCHAR(450) NOT NULL, identity_id NVARCHAR(64) NOT NULL, precedence INT NOT NULL, contribution_json NVARCHAR(MAX) NOT NULL, PRIMARY KEY NONCLUSTERED (connector_id, anchor))",
            "CREATE INDEX identity_links_identity ON identity_links (identity_id)",
            "CREATE TABLE identity_keys (attr NVARCHAR(128) NOT NULL, value NVARCHAR(400) NOT NULL, identity_id NVARCHAR(64) NOT NULL, PRIMARY KEY NONCLUSTERED (attr, value, identity_id))",
            "CREATE INDEX identity_keys_identity ON identity_keys (identity_id)",
            "CREATE INDEX identities_name ON identities (display_name)",
        ],
    },
    Migration {
        version: 3,
        name: "fence incarnation",
        statements: &[
            "ALTER TABLE fence ADD holder_incarnation NVARCHAR(64) NOT NULL DEFAULT N''",
            "CREATE TABLE engine_instances_v3 (instance NVARCHAR(256) NOT NULL, incarnation NVARCHAR(64) NOT NULL, host NVARCHAR(256) NOT NULL, role NVARCHAR(16) NOT NULL, epoch BIGINT NOT NULL, version NVARCHAR(64) NOT NULL, started_at BIGINT NOT NULL, last_heartbeat BIGINT NOT NULL, PRIMARY KEY (instance, incarnation))",
            "INSERT INTO engine_instances_v3 (instance, incarnation, host, role, epoch, version, started_at, last_heartbeat) SELECT instance, N'', host, role, epoch, version, started_at, last_heartbeat FROM engine_instances",
            "DROP TABLE engine_instances",
            "EXEC sp_rename N'engine_instances_v3', N'engine_instances'",
        ],
    },
    Migration {
        version: 4,
        name: "retention",
        statements: RETENTION_INDEXES,
    },
    Migration {
        version: 5,
        name: "drop unused identity name index",
        statements: &["DROP INDEX identities_name ON identities"],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_have_the_same_versions_in_order() {
        let a: Vec<_> = SQLITE.iter().map(|m| (m.version, m.name)).collect();
        let b: Vec<_> = MSSQL.iter().map(|m| (m.version, m.name)).collect();
        assert_eq!(a, b);
        for w in a.windows(2) {
            assert!(w[0].0 < w[1].0, "versions must increase");
        }
    }

    #[test]
    fn backends_create_the_same_tables() {
        fn tables(m: &[Migration]) -> Vec<String> {
            let mut t: Vec<String> = m
                .iter()
                .flat_map(|m| m.statements.iter())
                .filter_map(|s| s.strip_prefix("CREATE TABLE "))
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
                .collect();
            t.sort();
            t
        }
        assert_eq!(tables(SQLITE), tables(MSSQL));
        for required in [
            "engine_instances",
            "fence",
            "relays",
            "connectors",
            "schedules",
            "runs",
            "import_batches",
            "watermarks",
            "cs_objects",
            "identities",
            "audit_log",
            "secrets",
            "identity_links",
            "identity_keys",
        ] {
            assert!(tables(SQLITE).iter().any(|t| t == required), "{required}");
        }
    }
}
