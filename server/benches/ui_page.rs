//! The first page a signed-in operator sees: its transfer size and how fast the active renders
//! it, against a real standalone server over TLS (issue 16: under 300 KB, under 200 ms).
//!
//! `cargo bench -p identitymesh-server --bench ui_page [-- --reps N --connectors N]`;
//! `BENCH_SERVER_BIN` measures another server binary (A/B).
//!
//! The server gets a realistic setting first: N connectors (CSV, each with a drop folder and a
//! schedule), 5 relays, and one full run per connector, so the overview lists instances,
//! relays, the sync state and the last cutover as it would in production. Then the operator
//! signs in with the bootstrap token (a session cookie, as a browser holds it) and the bench
//! fetches `/` (and, once, the stylesheet and script it links) `reps` times over one
//! keep-alive connection. Reference measured in the same run: `GET /api/instances` with the
//! same cookie, one of the reads the page makes, so the ratio says what rendering adds.

mod common;

use std::time::Instant;

use common::{loadavg, median, Server};
use serde_json::json;

const TARGET_BYTES: usize = 300 * 1024;
const TARGET_MS: f64 = 200.0;

fn arg(name: &str, default: usize) -> usize {
    let v = common::arg(name, &default.to_string());
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
}

fn p95(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 95 / 100).min(v.len() - 1)]
}

#[tokio::main]
async fn main() {
    let reps = arg("--reps", 200).max(5);
    let connectors = arg("--connectors", 20);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path()).await;
    let drop = dir.path().join("data/drop");
    for i in 0..connectors {
        let folder = format!("hr-{i}");
        std::fs::create_dir_all(drop.join(&folder)).unwrap();
        let mut csv = String::from("id,mail,cn\n");
        for p in 0..50 {
            csv.push_str(&format!("{i}-{p},p{p}@example.org,Person {p}\n"));
        }
        std::fs::write(drop.join(&folder).join("people.csv"), csv).unwrap();
        let c = s
            .api(
                reqwest::Method::POST,
                "/api/connectors",
                json!({"name": folder, "kind": "csv",
                    "config": {"folder": folder, "object_type": "people", "anchor_column": "id"},
                    "rules": {"precedence": 10 + i, "object_types": {"people": {
                        "join": [{"source": "lower(mail)", "identity_attribute": "mail"}],
                        "flows": [{"target": "mail", "expression": "lower(mail)"}], "display_name": "cn"}}}}),
            )
            .await;
        let id = c["id"].as_str().unwrap().to_string();
        s.api(
            reqwest::Method::POST,
            "/api/schedules",
            json!({"connector_id": id, "kind": "interval", "spec": "1h", "mode": "full"}),
        )
        .await;
        let run = s.run(&id, "full").await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    for i in 0..5 {
        s.api(
            reqwest::Method::POST,
            "/api/relays",
            json!({"name": format!("branch-{i}")}),
        )
        .await;
    }

    // Sign in as a browser does: the session cookie from the bootstrap-token form.
    let r = s
        .client
        .post(format!("{}/auth/login", s.base))
        .form(&[("token", s.token.as_str())])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "sign-in: {}", r.status());
    let cookie = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|c| c.to_str().ok())
        .find(|c| c.starts_with("im_session="))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let get = |path: String| {
        let req = s
            .client
            .get(format!("{}{path}", s.base))
            .header("cookie", &cookie);
        async move {
            let t = Instant::now();
            let r = req.send().await.unwrap();
            let status = r.status();
            let body = r.bytes().await.unwrap();
            (status, body, t.elapsed().as_secs_f64() * 1000.0)
        }
    };
    let (status, page, _) = get("/".into()).await;
    assert!(status.is_success(), "GET /: {status}");
    let html = String::from_utf8_lossy(&page).into_owned();
    assert!(
        html.contains("data-testid=\"active-instance\""),
        "not the overview: {html}"
    );
    let mut assets = 0;
    for link in ["/assets/app.css", "/assets/app.js"] {
        let (st, body, _) = get(format!("{link}?v=0")).await;
        assert!(st.is_success(), "{link}: {st}");
        assets += body.len();
    }
    let (mut page_ms, mut api_ms) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        page_ms.push(get("/".into()).await.2);
        api_ms.push(get("/api/instances".into()).await.2);
    }
    let mut ratios: Vec<f64> = page_ms.iter().zip(&api_ms).map(|(p, a)| p / a).collect();
    let total = page.len() + assets;
    let (pm, am) = (median(&mut page_ms), median(&mut api_ms));
    println!("ui_page: {connectors} connectors with a schedule and a finished run each, 5 relays; {reps} reps, load {}",
        loadavg());
    println!("  first page transfer: {total} bytes ({} HTML + {assets} CSS and script), target < {TARGET_BYTES}: {}",
        page.len(), if total < TARGET_BYTES { "met" } else { "MISSED" });
    println!("  GET / (overview, rendered from 4 API reads): median {pm:.2} ms, p95 {:.2} ms, target < {TARGET_MS} ms: {}",
        p95(&mut page_ms), if pm < TARGET_MS { "met" } else { "MISSED" });
    println!("  reference GET /api/instances: median {am:.2} ms; page / reference run by run: median {:.2}x", median(&mut ratios));
}
