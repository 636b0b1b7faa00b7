//! Multi-row statements: a handful of statements per import page or composer chunk, not a
//! few per object (each statement is a round trip to SQLite's worker thread).

/// Rows per multi-row statement: 9 parameters a row stays far below SQLite's 32,766.
pub(super) const ROWS_PER_STATEMENT: usize = 500;

pub(super) type Builder<'q> = sqlx::QueryBuilder<'q, sqlx::Sqlite>;

/// A built multi-row statement, kept out of the connection's statement cache: each distinct
/// row count would otherwise stay in every connection's cache, hundreds of KiB apiece.
pub(super) fn build_once<'b, 'args>(
    q: &'b mut Builder<'args>,
) -> sqlx::query::Query<'b, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'args>> {
    q.build().persistent(false)
}

/// Appends `(?, ?, …)`, one bound value per item: the list of an `IN`.
pub(super) fn push_in<'q, T>(q: &mut Builder<'q>, items: impl IntoIterator<Item = T>)
where
    T: 'q + sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    q.push("(");
    let mut list = q.separated(", ");
    for item in items {
        list.push_bind(item);
    }
    q.push(")");
}

/// Appends `(SELECT t.rowid FROM (VALUES (…), …) v JOIN {table} t ON t.{col} = v.columnN …)`:
/// the rows of `table` whose `columns` equal one item's values (`row` binds them), for a
/// `rowid IN`. The row-value form `(a, b) IN (VALUES …)` says the same, but SQLite answers it
/// with a scan of the whole table.
pub(super) fn push_rowids_matching<'q, I>(
    q: &mut Builder<'q>,
    table: &str,
    columns: &[&str],
    items: impl IntoIterator<Item = I>,
    mut row: impl FnMut(&mut sqlx::query_builder::Separated<'_, 'q, sqlx::Sqlite, &'static str>, I),
) {
    q.push("(SELECT t.rowid FROM (VALUES ");
    for (n, item) in items.into_iter().enumerate() {
        q.push(if n == 0 { "(" } else { ", (" });
        row(&mut q.separated(", "), item);
        q.push(")");
    }
    q.push(format!(") v JOIN {table} t ON "));
    for (i, c) in columns.iter().enumerate() {
        let and = if i == 0 { "" } else { " AND " };
        q.push(format!("{and}t.{c} = v.column{}", i + 1));
    }
    q.push(")");
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::super::SqliteStore;
    use super::*;
    use crate::store::Store;

    /// The batched statements find their rows through an index, not a scan of the table: a
    /// scan per statement made every composer chunk read the whole connector space.
    #[tokio::test]
    async fn batched_row_matches_use_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
        store.migrate().await.unwrap();
        let cases: [(&str, &str, &[&str]); 3] = [
            (
                "UPDATE cs_objects SET dirty = 0 WHERE rowid IN ",
                "cs_objects",
                &["connector_id", "anchor", "rev"],
            ),
            (
                "DELETE FROM identity_links WHERE rowid IN ",
                "identity_links",
                &["connector_id", "anchor"],
            ),
            (
                "SELECT attr, value, identity_id FROM identity_keys WHERE rowid IN ",
                "identity_keys",
                &["attr", "value"],
            ),
        ];
        for (head, table, cols) in cases {
            let mut q = Builder::new(format!("EXPLAIN QUERY PLAN {head}"));
            push_rowids_matching(&mut q, table, cols, 0..3, |r, i| {
                for _ in cols.iter() {
                    r.push_bind(i);
                }
            });
            let plan: Vec<String> = q
                .build()
                .fetch_all(&store.pool)
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>(3))
                .collect();
            assert!(
                plan.iter()
                    .any(|d| d.contains("USING") && d.contains("INDEX")),
                "{head}: {plan:?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|d| d == &format!("SCAN {table}") || d == "SCAN t"),
                "{head}: {plan:?}"
            );
        }
    }
}
