//! CSV connector streaming benchmark: the connector's objects/s and its process's peak RSS for
//! a small and a large drop file, to show memory stays flat as the file grows.
//!
//!     cargo bench -p identitymesh-connectors --bench csv_stream -- [--sizes 10M,1G] [--reps 3]
//!         [--dir /path/with/room] [--encoding utf-8|utf-16le]
//!
//! Environment equivalents: `CSV_BENCH_SIZES`, `CSV_BENCH_REPS`, `CSV_BENCH_DIR`,
//! `CSV_BENCH_ENCODING`.
//!
//! Per size: a CSV of about that many bytes (people rows: id, name, mail with two values,
//! department, phone) is written, streaming, to a temp dir under `--dir` (default: the system
//! temp dir if it has room for the largest file plus 1 GiB, else `~/.cache/identitymesh`).
//! Per rep: a child process (this binary, `--child`) imports the folder through
//! `CsvConnector::import` into a sink that drops each page (a channel of 2 pages, as the
//! runner's), and reports objects, seconds and its peak RSS (VmHWM from /proc/self/status),
//! so each figure covers one import and nothing else. The file is deleted after its reps.
//! The table gives the median of the reps and the peak-RSS ratio of each size over the first.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use identitymesh_connectors::model::{ImportMode, Page};
use identitymesh_connectors::{CsvConfig, CsvConnector};

struct Args {
    sizes: Vec<u64>,
    reps: usize,
    dir: Option<PathBuf>,
    encoding: String,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|_| format!("not a size: {s:?} (e.g. 10M, 1G)"))
}

fn args() -> Result<Args, String> {
    let env = |k: &str| std::env::var(k).ok();
    let mut sizes = env("CSV_BENCH_SIZES").unwrap_or_else(|| "10M,1G".into());
    let mut reps = env("CSV_BENCH_REPS").unwrap_or_else(|| "3".into());
    let mut dir = env("CSV_BENCH_DIR");
    let mut encoding = env("CSV_BENCH_ENCODING").unwrap_or_else(|| "utf-8".into());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--sizes" => sizes = val()?,
            "--reps" => reps = val()?,
            "--dir" => dir = Some(val()?),
            "--encoding" => encoding = val()?,
            // cargo bench passes --bench; nothing else is expected.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        sizes: sizes.split(',').map(parse_size).collect::<Result<_, _>>()?,
        reps: reps.parse().map_err(|_| format!("--reps {reps:?}"))?,
        dir: dir.map(PathBuf::from),
        encoding,
    })
}

/// Free bytes on the filesystem holding `p`, from `df`.
fn free_bytes(p: &Path) -> Option<u64> {
    let out = Command::new("df").args(["-Pk"]).arg(p).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().nth(1)?;
    line.split_whitespace()
        .nth(3)?
        .parse::<u64>()
        .ok()
        .map(|k| k * 1024)
}

fn work_dir(args: &Args) -> Result<PathBuf, String> {
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    let need = largest + (1 << 30);
    let candidates: Vec<PathBuf> = match &args.dir {
        Some(d) => vec![d.clone()],
        None => {
            let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
            vec![
                std::env::temp_dir(),
                Path::new(&home).join(".cache/identitymesh"),
            ]
        }
    };
    for c in &candidates {
        std::fs::create_dir_all(c).map_err(|e| format!("{}: {e}", c.display()))?;
        match free_bytes(c) {
            Some(free) if free >= need => return Ok(c.clone()),
            Some(free) => eprintln!(
                "{}: {} MiB free, {} MiB needed; trying the next place",
                c.display(),
                free >> 20,
                need >> 20
            ),
            None => return Ok(c.clone()),
        }
    }
    Err("no directory with room for the largest file; pass --dir".into())
}

/// Writes people rows until the file holds about `bytes`; returns the row count.
fn generate(path: &Path, bytes: u64, encoding: &str) -> std::io::Result<u64> {
    let utf16 = encoding.eq_ignore_ascii_case("utf-16le");
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut written = 0u64;
    let emit = |out: &mut std::io::BufWriter<std::fs::File>, s: &str| -> std::io::Result<u64> {
        if utf16 {
            let mut n = 0;
            for u in s.encode_utf16() {
                out.write_all(&u.to_le_bytes())?;
                n += 2;
            }
            Ok(n)
        } else {
            out.write_all(s.as_bytes())?;
            Ok(s.len() as u64)
        }
    };
    if utf16 {
        out.write_all(&[0xFF, 0xFE])?;
        written += 2;
    }
    written += emit(&mut out, "id,name,mail,department,phone\n")?;
    let mut rows = 0u64;
    let mut line = String::with_capacity(160);
    while written < bytes {
        line.clear();
        use std::fmt::Write as _;
        let _ = writeln!(
            line,
            "e{rows:09},\"Zoë Person {rows}\",p{rows}@example.org;p.{rows}@example.org,Dept {},+1 555 {:07}",
            rows % 97,
            rows % 10_000_000
        );
        written += emit(&mut out, &line)?;
        rows += 1;
    }
    out.flush()?;
    Ok(rows)
}

/// The child: imports `folder` once and prints `objects seconds peak_rss_kib`.
fn child(folder: &str, encoding: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let cfg: CsvConfig = serde_json::from_value(serde_json::json!({
        "folder": folder,
        "object_type": "people",
        "anchor_column": "id",
        "encoding": encoding,
        "multi_value_separator": ";",
    }))
    .map_err(|e| e.to_string())?;
    let (objects, secs) = rt.block_on(async {
        let conn = CsvConnector::new(cfg).map_err(|e| e.to_string())?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Page>(2);
        let sink = tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(p) = rx.recv().await {
                n += p.objects.len() as u64;
                drop(p);
            }
            n
        });
        let start = Instant::now();
        let summary = conn
            .import("people", &ImportMode::Full, tx)
            .await
            .map_err(|e| e.to_string())?;
        let n = sink.await.map_err(|e| e.to_string())?;
        let secs = start.elapsed().as_secs_f64();
        if n != summary.objects {
            return Err(format!("sink saw {n}, summary says {}", summary.objects));
        }
        Ok::<_, String>((n, secs))
    })?;
    println!("{objects} {secs:.3} {}", peak_rss_kib().unwrap_or(0));
    Ok(())
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some("--child") {
        let r = child(&raw[2], raw.get(3).map_or("utf-8", String::as_str));
        if let Err(e) = r {
            eprintln!("child: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("csv_stream: {e}");
            std::process::exit(2);
        }
    };
    let base = match work_dir(&args) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("csv_stream: {e}");
            std::process::exit(2);
        }
    };
    let exe = std::env::current_exe().expect("current exe");
    println!(
        "csv_stream: encoding {}, {} rep(s) per size, files under {}",
        args.encoding,
        args.reps,
        base.display()
    );
    println!(
        "{:>8} {:>10} {:>12} {:>14} {:>14}  reps (objects/s, peak RSS MiB)",
        "size", "rows", "median s", "median obj/s", "median RSS MiB"
    );
    let mut first_rss = None;
    for &size in &args.sizes {
        let dir = tempfile::Builder::new()
            .prefix("csv-stream-")
            .tempdir_in(&base)
            .expect("temp dir");
        let file = dir.path().join("people.csv");
        let rows = generate(&file, size, &args.encoding).expect("generate");
        let (mut secs, mut rates, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let mut detail = Vec::new();
        for _ in 0..args.reps {
            let out = Command::new(&exe)
                .arg("--child")
                .arg(dir.path())
                .arg(&args.encoding)
                .output()
                .expect("child");
            if !out.status.success() {
                eprintln!("child failed: {}", String::from_utf8_lossy(&out.stderr));
                std::process::exit(1);
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let f: Vec<f64> = text
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let (objects, s, kib) = (f[0], f[1], f[2]);
            assert_eq!(objects as u64, rows, "every row imported");
            secs.push(s);
            rates.push(objects / s);
            rss.push(kib / 1024.0);
            detail.push(format!("{:.0}/s {:.1}", objects / s, kib / 1024.0));
        }
        drop(dir);
        let m_rss = median(&mut rss.clone());
        println!(
            "{:>8} {:>10} {:>12.2} {:>14.0} {:>14.1}  {}",
            human(size),
            rows,
            median(&mut secs),
            median(&mut rates),
            m_rss,
            detail.join(", ")
        );
        match first_rss {
            None => first_rss = Some((size, m_rss)),
            Some((s0, r0)) => println!(
                "{:>8} peak RSS {:.2}x that of {} for {:.0}x the bytes",
                human(size),
                m_rss / r0,
                human(s0),
                size as f64 / s0 as f64
            ),
        }
        std::io::stdout().flush().ok();
    }
}
