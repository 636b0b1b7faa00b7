//! The statements checked as T-SQL, and the scripted connection (`Recorder`) the round-trip
//! tests of `runs.rs` and `identities.rs` count requests with.

use super::*;

use sqlparser::dialect::MsSqlDialect;

use sqlparser::parser::Parser;

pub(super) fn parse(stmt: &str) {
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

/// The constants of type `ty` declared in a module's source `src` before its `ALL`, and the names `ALL` lists.
fn declared_and_listed(src: &str, ty: &str) -> (Vec<String>, Vec<String>) {
    let (body, rest) = src.split_once("pub const ALL: ").unwrap();
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
    for (module, src, ty, len) in [
        ("sql", include_str!("sql.rs"), "&str", sql::ALL.len()),
        ("multi", include_str!("multi.rs"), "Shape", multi::ALL.len()),
    ] {
        let (declared, listed) = declared_and_listed(src, ty);
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
pub(super) fn highest_param(q: &str) -> usize {
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
pub(super) struct Recorder<F> {
    pub(super) sent: Vec<String>,
    answer: F,
}

impl<F> Recorder<F> {
    pub(super) fn new(answer: F) -> Self {
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
    async fn fetch(&mut self, q: &str, params: &[&dyn ToSql]) -> Result<Vec<Vec<Row>>, StoreError> {
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
pub(super) const TX_FRAME: usize = 2;

pub(super) fn row(values: Vec<tiberius::ColumnData<'static>>) -> Row {
    values
        .into_iter()
        .enumerate()
        .fold(Row::builder(), |b, (i, v)| {
            b.column(format!("c{i}"), tiberius::ColumnType::Null, v)
        })
        .build()
}

pub(super) fn string(s: &str) -> tiberius::ColumnData<'static> {
    tiberius::ColumnData::String(Some(s.to_string().into()))
}

pub(super) fn token() -> FenceToken {
    FenceToken {
        instance: "im-a".into(),
        incarnation: "p1".into(),
        epoch: 7,
    }
}

/// The fence as `token` holds it.
pub(super) fn fence_row() -> Row {
    let t = token();
    row(vec![
        tiberius::ColumnData::I64(Some(t.epoch)),
        string(&t.instance),
        string(&t.incarnation),
    ])
}

pub(super) fn text_of(v: &tiberius::ColumnData<'_>) -> String {
    match v {
        tiberius::ColumnData::String(Some(s)) => s.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

pub(super) fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

pub(super) fn fence_only(q: &str, _: &[tiberius::ColumnData<'_>]) -> Vec<Vec<Row>> {
    if q == sql::FENCE_LOCKED {
        vec![vec![fence_row()]]
    } else {
        Vec::new()
    }
}

/// A composer chunk of `n` new identities: each put with two join keys, linked, composed
/// and audited.
pub(super) fn compose_chunk_of(n: usize) -> Vec<ComposeWrite> {
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
