//! Structured logs to stdout and to a daily file `logs/identitymesh-YYYYMMDD.log`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// Appends to the file of the current UTC day, switching files at midnight.
#[derive(Clone)]
pub struct DailyFile {
    dir: PathBuf,
    current: Arc<Mutex<Option<(String, File)>>>,
}

impl DailyFile {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.into(),
            current: Arc::new(Mutex::new(None)),
        })
    }

    pub fn file_name(date: chrono::NaiveDate) -> String {
        format!("identitymesh-{}.log", date.format("%Y%m%d"))
    }
}

pub struct DailyWriter(DailyFile);

impl Write for DailyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let name = DailyFile::file_name(chrono::Utc::now().date_naive());
        let mut cur = self
            .0
            .current
            .lock()
            .map_err(|_| std::io::Error::other("log lock poisoned"))?;
        if cur.as_ref().map(|(n, _)| n != &name).unwrap_or(true) {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.0.dir.join(&name))?;
            *cur = Some((name, f));
        }
        match cur.as_mut() {
            Some((_, f)) => f.write(buf),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if let Ok(mut cur) = self.0.current.lock() {
            if let Some((_, f)) = cur.as_mut() {
                f.flush()?;
            }
        }
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for DailyFile {
    type Writer = DailyWriter;
    fn make_writer(&'a self) -> Self::Writer {
        DailyWriter(self.clone())
    }
}

/// Installs the global subscriber. `RUST_LOG` filters (default: info).
pub fn init(log_dir: &Path) -> std::io::Result<()> {
    let file = DailyFile::new(log_dir)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_target(false))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_target(false)
                .with_writer(file),
        )
        .try_init();
    Ok(())
}
