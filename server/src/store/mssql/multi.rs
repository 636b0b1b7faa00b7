//! The multi-row statements of the import and compose paths. Their text depends on how many
//! rows they carry, so each is a [`Shape`]: the shared parameters come first (`@P1`…), then
//! each row's, and [`Shape::max_rows`] is how many rows one statement may carry.

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
